"""Pillow reference for tessera-data's parity tests.

Usage: python pillow_ref.py JOB.json

JOB.json holds {"cases": [...]}; each case reads a raw RGB input
(`input`, `width`, `height`), applies `op` with `args` the way torchvision's
PIL path, timm 0.3.x RandAugment or VISSL do, and writes raw RGB bytes to
`output`. Sizes of the outputs go to JOB.json + ".out.json". The "encode" and
"decode" ops write image files with Pillow and read them back with
`Image.open(path).convert("RGB")`, as VISSL's loader does.

Written for these tests; it uses only Pillow and the standard library.
"""

import json
import sys

import PIL
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

FILL = (128, 128, 128)


def load(case):
    with open(case["input"], "rb") as f:
        data = f.read()
    return Image.frombytes("RGB", (case["width"], case["height"]), data)


def center_crop(img, crop_h, crop_w):
    # torchvision.transforms.functional.center_crop (pads with 0 when larger).
    w, h = img.size
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        padded = Image.new("RGB", (w + left + right, h + top + bottom), (0, 0, 0))
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if crop_w == w and crop_h == h:
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def adjust_hue(img, hue_factor):
    # torchvision's PIL adjust_hue: uint8 wrap-around of H after int32 truncation.
    h, s, v = img.convert("HSV").split()
    shift = int(hue_factor * 255) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


def rand_augment_op(img, name, arg, resample):
    # The op functions of timm 0.3.x auto_augment.py as VISSL calls them.
    kw = dict(resample=resample, fillcolor=FILL)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **kw)
    if name in ("Posterize", "PosterizeIncreasing"):
        if arg <= 0:
            # Pillow < 10 mapped 0 bits to black (mask ~255); Pillow 13 raises
            # ValueError instead, which would crash VISSL at magnitude 10.
            return img.point([0] * 768)
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        return solarize_add(img, arg)
    if name in ("Color", "ColorIncreasing"):
        return ImageEnhance.Color(img).enhance(arg)
    if name in ("Contrast", "ContrastIncreasing"):
        return ImageEnhance.Contrast(img).enhance(arg)
    if name in ("Brightness", "BrightnessIncreasing"):
        return ImageEnhance.Brightness(img).enhance(arg)
    if name in ("Sharpness", "SharpnessIncreasing"):
        return ImageEnhance.Sharpness(img).enhance(arg)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **kw)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **kw)
    if name == "TranslateXRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, arg * img.size[0], 0, 1, 0), **kw)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, arg * img.size[1]), **kw)
    raise ValueError("unknown RandAugment op " + name)


def run(case):
    op, a = case["op"], case.get("args", {})
    if op == "encode":
        # Write a file from the raw input; then decode it like VISSL's loader.
        img = load(case)
        mode = a["mode"]
        if mode == "P":
            img = img.quantize(colors=a.get("colors", 200))
            if a.get("transparency") is not None:
                img.info["transparency"] = a["transparency"]
        elif mode == "I;16":
            # 16-bit grayscale from the gray values times a factor.
            gray = img.convert("L")
            img = Image.new("I;16", gray.size)
            img.putdata([v * a.get("scale", 1) for v in gray.getdata()])
        elif mode != "RGB":
            img = img.convert(mode)
        params = {k: v for k, v in a.get("save", {}).items()}
        if "transparency" in params and isinstance(params["transparency"], list):
            params["transparency"] = tuple(params["transparency"])
        img.save(case["file"], **params)
        return Image.open(case["file"]).convert("RGB")
    if op == "decode":
        return Image.open(case["file"]).convert("RGB")
    img = load(case)
    if op == "resize":
        return img.resize(tuple(a["size"]), a["filter"])
    if op == "resized_crop":
        t, l, h, w = a["top"], a["left"], a["height"], a["width"]
        return img.crop((l, t, l + w, t + h)).resize((a["size"][1], a["size"][0]), a["filter"])
    if op == "center_crop":
        return center_crop(img, a["size"][0], a["size"][1])
    if op == "hflip":
        return img.transpose(Image.FLIP_LEFT_RIGHT)
    if op == "brightness":
        return ImageEnhance.Brightness(img).enhance(a["factor"])
    if op == "contrast":
        return ImageEnhance.Contrast(img).enhance(a["factor"])
    if op == "saturation":
        return ImageEnhance.Color(img).enhance(a["factor"])
    if op == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(a["factor"])
    if op == "hue":
        return adjust_hue(img, a["factor"])
    if op == "grayscale":
        return img.convert("L").convert("RGB")
    if op == "gaussian_blur":
        return img.filter(ImageFilter.GaussianBlur(radius=a["radius"]))
    if op == "rand_augment":
        return rand_augment_op(img, a["name"], a["arg"], a["filter"])
    raise ValueError("unknown op " + op)


def main():
    if PIL.__version__ != "13.0.0":
        sys.exit("expected Pillow 13.0.0, found " + PIL.__version__)
    with open(sys.argv[1]) as f:
        job = json.load(f)
    sizes = []
    for case in job["cases"]:
        out = run(case)
        if out.mode != "RGB":
            out = out.convert("RGB")
        with open(case["output"], "wb") as f:
            f.write(out.tobytes())
        sizes.append(list(out.size))
    with open(sys.argv[1] + ".out.json", "w") as f:
        json.dump(sizes, f)


if __name__ == "__main__":
    main()
