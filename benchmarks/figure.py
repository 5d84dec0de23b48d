"""A bar chart of ratios with min-max whiskers, as a standalone SVG (no plotting library): what
`make bench` draws for the documentation's Benchmarks page."""

from __future__ import annotations

from collections.abc import Sequence

Bar = tuple[str, float, float, float]  # label, median, min, max


def ratio_chart(bars: Sequence[Bar], title: str, reference: float = 1.0) -> str:
    """An SVG of one horizontal bar per (label, median, min, max), with a line at `reference`."""
    width, left, row, top = 640, 170, 26, 40
    height = top + row * len(bars) + 40
    scale = (width - left - 30) / max(high for _, _, _, high in bars)
    x = lambda value: left + value * scale  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for index, (label, median, low, high) in enumerate(bars):
        y = top + index * row
        parts += [f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{label}</text>',
                  f'<rect x="{left}" y="{y + 4}" width="{median * scale:.1f}" height="16" '
                  'fill="#5470c6"/>',
                  f'<line x1="{x(low):.1f}" y1="{y + 12}" x2="{x(high):.1f}" y2="{y + 12}" '
                  'stroke="#222"/>',
                  f'<text x="{x(high) + 6:.1f}" y="{y + 15}">{median:.1f}x</text>']
    bottom = top + row * len(bars)
    parts += [f'<line x1="{x(reference):.1f}" y1="{top}" x2="{x(reference):.1f}" '
              f'y2="{bottom}" stroke="#c00" stroke-dasharray="4 3"/>',
              f'<text x="{x(reference):.1f}" y="{bottom + 16}" text-anchor="middle" '
              f'fill="#c00">{reference:g}x</text>', "</svg>"]
    return "\n".join(parts) + "\n"
