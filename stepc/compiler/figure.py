"""memory.png: per-stage model-state memory against vanilla and the budget (the paper's Figure 2).

Drawn with Pillow rather than matplotlib: importing pyplot costs ~1 s, more than the rest of a
compile together, for a chart of a few bars. Output is byte-identical for the same plan.
"""

from __future__ import annotations

import io

from stepc.schema.plan import Plan

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 50, 70
GREY, BLUE, RED, INK, GRID = (158, 158, 158), (31, 119, 180), (214, 39, 40), (30, 30, 30), (225, 225, 225)


def memory_png(plan: Plan, title: str) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    bars = [("vanilla", f"{sum(plan.layers)} layers", plan.vanilla_peak_bytes, GREY)]
    bars += [(f"stage {s.index}", f"{s.total_layers} layers", s.peak_bytes, BLUE) for s in plan.stages]
    budget = plan.budget_bytes
    top = max([b[2] for b in bars] + ([budget] if budget else [])) * 1.12
    plot_h, plot_w = HEIGHT - TOP - BOTTOM, WIDTH - LEFT - RIGHT

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    for k in range(6):  # horizontal grid with GB labels
        value = top * k / 5
        draw.line([(LEFT, y(value)), (WIDTH - RIGHT, y(value))], fill=GRID)
        draw.text((LEFT - 8, y(value)), f"{value / 1e9:.2f}" if top >= 1e9 else f"{value / 1e6:.1f}", fill=INK, font=small,
                  anchor="rm")
    slot = plot_w / len(bars)
    for i, (label, sub, value, color) in enumerate(bars):
        x0, x1 = LEFT + slot * (i + 0.2), LEFT + slot * (i + 0.8)
        draw.rectangle([(x0, y(value)), (x1, y(0))], fill=color)
        shown = f"{value / 1e9:.3f} GB" if value >= 1e9 else f"{value / 1e6:.2f} MB"
        draw.text(((x0 + x1) / 2, y(value) + 5), shown, fill="white", font=small, anchor="ma")  # inside: clear of the budget line
        draw.text(((x0 + x1) / 2, y(0) + 6), label, fill=INK, font=font, anchor="ma")
        draw.text(((x0 + x1) / 2, y(0) + 24), sub, fill=INK, font=small, anchor="ma")
    if budget:
        for x in range(LEFT, WIDTH - RIGHT, 12):  # dashed budget line
            draw.line([(x, y(budget)), (min(x + 7, WIDTH - RIGHT), y(budget))], fill=RED, width=2)
        draw.text((WIDTH - RIGHT, y(budget) - 4), "budget", fill=RED, font=small, anchor="rd")
    draw.line([(LEFT, TOP), (LEFT, y(0)), (WIDTH - RIGHT, y(0))], fill=INK)
    unit = "GB" if top >= 1e9 else "MB"
    draw.text((WIDTH / 2, 18), title, fill=INK, font=font, anchor="mm")
    draw.text((8, TOP - 20), f"model states ({unit}, {plan.accounting} accounting)", fill=INK, font=small)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
