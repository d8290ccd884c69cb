"""torch.library custom ops (namespace ``vit_fast``): registration, fake and autograd only.

Each module is imported lazily by ``vit_fast.functional`` when its backend is chosen, so that
importing vit_fast never imports triton.
"""
