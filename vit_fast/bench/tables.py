"""Plain-text tables and sizes, as every bench report prints them (one module below the reports,
so that the command line and the reports need not import each other)."""


def fmt_table(rows, columns, title=None):
    """Plain-text table (also valid Markdown): columns = [(header, key or callable)]."""
    cells = [[str(h) for h, _ in columns]]
    for r in rows:
        cells.append([str(k(r) if callable(k) else r[k]) for _, k in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [] if title is None else [title]
    for j, c in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def mib(n):
    return f"{n / 2**20:,.1f} MiB"
