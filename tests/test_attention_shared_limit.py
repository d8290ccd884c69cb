"""The attention forward's tile fits the device's shared memory per block: the 128 x 64 tile of
head dims 65-128 needs 112 KB on sm_80, more than the 99 KB that sm_86/sm_89/sm_120 allow, so
there the launcher takes a smaller tile instead of failing to launch (and falling back)."""
import torch

from vit_fast.kernels import attention as kernels
from vit_fast.kernels import attention_aot
from vit_fast.kernels import attention_config as configs

A100, RTX_4090 = 166912, 101376  # shared_memory_per_block_optin
LONG_128 = ("fwd", 128, False)


def test_fwd_config_picks_the_first_tile_that_fits():
    big = kernels.shipped_config(LONG_128)
    assert configs.fwd_shared_bytes(big, 128) == 114688 > RTX_4090
    assert configs.fwd_config(LONG_128) == big  # no limit known
    assert configs.fwd_config(LONG_128, shared_limit=A100) == big
    small = configs.fwd_config(LONG_128, shared_limit=RTX_4090)
    assert small != big and configs.fwd_shared_bytes(small, 128) <= RTX_4090
    assert small == configs.fwd_config(LONG_128, dropout=True, segments=True, shared_limit=RTX_4090)
    # Entries that already fit are kept; below every candidate, the smallest (it then fails to
    # launch and falls back, as before).
    for key in [k for k in kernels._CUDA_CONFIGS if k[0] == "fwd" and k != LONG_128]:
        assert configs.fwd_config(key, shared_limit=RTX_4090) == kernels.shipped_config(key), key
    assert configs.fwd_config(LONG_128, shared_limit=1024) == configs.fwd_configs(LONG_128)[-1]


def test_config_passes_the_limit_to_the_forward_only(monkeypatch):
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    f16 = torch.float16
    assert kernels._config("fwd", 197, 96, f16, shared_limit=RTX_4090) == \
        configs.fwd_config(LONG_128, shared_limit=RTX_4090)
    assert kernels._config("fwd", 197, 96, f16) == kernels.shipped_config(LONG_128)
    assert kernels._config("dq", 197, 96, f16, shared_limit=1024) == kernels.shipped_config(("dq", 128, False))


def test_shared_limit_is_read_from_the_device_once(monkeypatch):
    queries = []

    class Props:
        shared_memory_per_block_optin = RTX_4090

    def props(index):
        queries.append(index)
        return Props()
    monkeypatch.setattr(kernels, "_SHARED_LIMITS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    assert kernels._shared_limit(torch.device("cuda", 1)) == RTX_4090
    assert kernels._shared_limit(torch.device("cuda", 1)) == RTX_4090
    assert queries == [1]
    assert kernels._shared_limit(torch.device("cpu")) is None


class _RecordingKernel:
    """Stands in for attention_fwd_kernel: records the tile a launch asks for."""

    def __init__(self):
        self.tiles = []

    def __getitem__(self, grid):
        def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kwargs):
            self.tiles.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
        return launch


def test_the_launcher_uses_its_devices_limit(monkeypatch):
    """attention_fwd asks _shared_limit for qkv's device and launches the tile fwd_config picks."""
    recorder = _RecordingKernel()
    monkeypatch.setattr(kernels, "attention_fwd_kernel", recorder)
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    qkv = torch.randn(1, 197, 3 * 2 * 128, dtype=torch.float16)
    for limit in (A100, RTX_4090):
        monkeypatch.setattr(kernels, "_shared_limit", lambda device, limit=limit: limit)
        kernels.attention_fwd(qkv, 2, 128 ** -0.5)
    assert recorder.tiles == [configs.fwd_config(LONG_128, shared_limit=A100),
                              configs.fwd_config(LONG_128, shared_limit=RTX_4090)]


def test_every_tile_the_forward_can_pick_is_compiled_ahead_of_time():
    """attention_aot lists fwd_configs, not just the table: compile-check covers the small tiles."""
    built = {(max(64, s.constants["BLOCK_D"]), s.constants["HAS_DROPOUT"], s.constants["HAS_SEGMENTS"],
              (s.constants["BLOCK_M"], s.constants["BLOCK_N"], s.num_warps, s.num_stages))
             for s in attention_aot.aot_specs() if s.kernel.fn.__name__ == "attention_fwd_kernel"}
    for key in [k for k in kernels._CUDA_CONFIGS if k[0] == "fwd"]:
        for dropout in (False, True):
            for segments in (False, True):
                for limit in (None, A100, RTX_4090, 1024):
                    cfg = configs.fwd_config(key, dropout, segments, limit)
                    assert (key[1], dropout, segments, cfg) in built, (key, dropout, segments, limit)
