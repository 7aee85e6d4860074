"""Thumbnails of the example workflows for ComfyUI's template browser: ``example_workflows/<name>.jpg``.

The frontend lists a pack's templates by file name and asks for ``/api/workflow_templates/<pack>/
<name>.jpg`` for each (a 404 per template otherwise). It shows the file name as the title and, as the
description, the file name again with ``_`` as spaces: frontends 1.32.9, 1.49.6 and 1.58.1 take
translated titles and descriptions only for ComfyUI's own templates (``getTemplateTitle`` localizes
the "default" module only; a pack's ``locales/en/main.json`` reaches ``/i18n`` but no card). So the
thumbnail carries them: ``python -m tools.template_thumbnails`` draws, for every example in
:data:`TEMPLATES`, a 512 x 384 card with its human title, a one-line description, the PSO nodes it
runs in the order they run (left to right on the canvas) and, for the demo, its target digits.

A test (tests/integration/test_example_workflows.py) checks that every example has an entry here and
a thumbnail. Development only.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap

from tools.comfy_host import REPO_ROOT

EXAMPLES = REPO_ROOT / "example_workflows"
SIZE = (512, 384)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
FONT_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
BACKGROUND, PANEL, TEXT, ACCENT = (31, 59, 51), (36, 70, 60), (235, 240, 236), (127, 191, 159)

#: name -> (title, one-line description). Every shipped example has one.
TEMPLATES = {
    "pso_demo_digits_cpu": ("PSO demo (digits, CPU)",
                            "Runs as it opens: the shipped 4-step digits model learns bold strokes in a few "
                            "minutes on a CPU. Start here."),
    "pso_pick_and_train": ("PSO: pick pairs by hand, then train",
                           "Click the better of two samples per pair in the node; PSO trains on your picks "
                           "(demo model, CPU)."),
    "pso_style_transfer": ("PSO style transfer (SDXL-Turbo)",
                           "Teach a few-step model the style of your images: a folder of images with "
                           "captions."),
    "pso_concept": ("PSO concept (DMD2, DreamBooth-style)",
                    "A new subject from a few photos on SDXL + the DMD2 LoRA, with prior preservation."),
    "pso_preference_pairs": ("PSO from preference pairs (images)",
                             "Train from pairs you already have: preferred vs rejected images for a prompt."),
    "pso_pickapic_offline": ("PSO from Pick-a-Pic (offline)",
                             "Import Pick-a-Pic pairs, train offline PSO, evaluate with a reward."),
    "pso_zimage_turbo_style": ("PSO style transfer (Z-Image-Turbo)",
                               "Teach Z-Image-Turbo (8 steps) the style of your captioned images; separate "
                               "model, Qwen3 text encoder and VAE files."),
    "pso_wan22_video": ("PSO on video (Wan 2.2 TI2V-5B + 4-step LoRA)",
                        "Train a look into Wan 2.2 with its 4-step Turbo LoRA applied; before/after videos, "
                        "previews as frame strips."),
    "pso_online_preference": ("Online PSO with a reward model",
                              "Rounds of sampling, scoring with PickScore/HPSv2/aesthetic and training "
                              "(Eq. 7)."),
}
#: Display names of the PSO nodes on the cards (the pipeline strip).
SHORT = {"PSODemoModelLoader": "Demo Model", "PSODemoTargets": "Demo Targets",
         "PSOTargetImagesFromFolder": "Target Images", "PSOTargetImagesFromBatch": "Target Images",
         "PSOSampleReferences": "Sample References", "PSOBuildPairs": "Build Pairs",
         "PSOPreferencePairs": "Preference Pairs", "PSOImportPreferencePairs": "Import Pick-a-Pic",
         "PSOPickPairs": "Pick Pairs", "PSOLoadPairs": "Load Pairs", "PSOSavePairs": "Save Pairs",
         "PSOTrain": "PSO Train", "PSOOnlineTrain": "Online Train", "PSORewardModelLoader": "Reward Model",
         "PSOSaveLoRA": "Save LoRA", "PSOEvaluate": "Evaluate"}


def pipeline(workflow: dict) -> list[str]:
    """The PSO nodes a workflow runs (not muted), left to right, each name once."""
    nodes = sorted((n for n in workflow["nodes"] if n.get("mode", 0) == 0 and n["type"] in SHORT),
                   key=lambda n: (n["pos"][0], n["pos"][1]))
    out: list[str] = []
    for n in nodes:
        if SHORT[n["type"]] not in out:
            out.append(SHORT[n["type"]])
    return out


def card(name: str) -> bytes:
    """The thumbnail of one example as JPEG bytes."""
    from PIL import Image, ImageDraw, ImageFont

    title, desc = TEMPLATES[name]
    img = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    big, small = ImageFont.truetype(FONT_BOLD, 28), ImageFont.truetype(FONT, 17)
    tiny = ImageFont.truetype(FONT, 14)
    y = 22
    for line in textwrap.wrap(title, 26):
        draw.text((24, y), line, font=big, fill=TEXT)
        y += 36
    y += 6
    for line in textwrap.wrap(desc, 48):
        draw.text((24, y), line, font=small, fill=ACCENT)
        y += 23
    y += 14
    x = 24
    for i, step in enumerate(pipeline(json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8")))):
        w = int(draw.textlength(step, font=tiny)) + 16
        if x + w > SIZE[0] - 24:
            x, y = 24, y + 40
        elif i:
            draw.text((x - 14, y + 4), "›", font=small, fill=ACCENT)
        draw.rounded_rectangle((x, y, x + w, y + 28), 6, fill=PANEL, outline=ACCENT)
        draw.text((x + 8, y + 6), step, font=tiny, fill=TEXT)
        x += w + 18
    if name == "pso_demo_digits_cpu":  # the style it learns: the shipped bold digits
        digits = sorted((REPO_ROOT / "demo_model" / "bold_digits").glob("digit*_0.png"))
        for i, path in enumerate(digits):
            with Image.open(path) as d:
                img.paste(d.convert("RGB").resize((44, 44), Image.NEAREST), (24 + i * 47, SIZE[1] - 68))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    from pso.io import atomic_write_bytes

    shipped = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    missing = sorted(set(shipped) - set(TEMPLATES))
    if missing:
        print(f"add a title and description for {missing} to TEMPLATES", file=sys.stderr)
        return 1
    for name in shipped:
        atomic_write_bytes(EXAMPLES / f"{name}.jpg", card(name))
    print(f"wrote {len(shipped)} thumbnails")
    return 0


if __name__ == "__main__":
    sys.exit(main())
