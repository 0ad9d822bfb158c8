"""Copy the golden reference data the tests need into tests/golden_data/, compactly.

    python scripts/build_golden_testdata.py [--goldens ../shared/goldens]

Rules (the same for every method, so no golden tensor is silently dropped):
* model inputs and masks (large, and bit-exact by construction) are replaced by the sha256 of their
  bytes; the tests rebuild them from the PNGs and compare hashes;
* full-resolution maps (last two dims >= 256) are stored strided, `[..., ::7, ::7]` for 518 px and
  `[..., ::6, ::6]` for 336 px, under the name `<tensor>@s<stride>`;
* every other tensor is copied unchanged; config.json is copied as a file, checkpoints (.pth) too,
  except that bit-identical tensors inside one checkpoint (the dead deep-copied projections of the
  AnomalyCLIP/FAPrompt format) are saved with one shared storage: torch.load returns the same keys
  and values, at a fraction of the size.
The tiny CLIP weights are not copied: they are rebuilt from the recipe (zsad_core.tiny_clip).
The metric goldens (`metrics`, selectable like a method) are small: the case files and the JSON
records the tests and notebooks/01_metrics.ipynb read are copied unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden_data"
METHODS = ["clip_zeroshot", "anomalyclip", "aprilgan", "winclip", "aaclip", "faprompt", "bayespfl"]
METRICS_FILES = ["README.md", "canonical_values.json", "values.json", "aggregate_example.json",
                 "aupro_attribution.json", "cases_index.json", "timing_aupro.json", "meta.json"]
HASH_ONLY = {"images", "masks", "input.image", "input.gt_mask", "image_resized_u8", "mask_u8", "mask_loss"}


def stride_for(size: int) -> int:
    return 7 if size % 7 == 0 or size > 400 else 6


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def compact(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    kept, hashes = {}, {}
    for name, t in tensors.items():
        if name in HASH_ONLY:
            hashes[name] = {"sha256": tensor_sha256(t), "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape)}
        elif t.dim() >= 2 and min(t.shape[-2:]) >= 256:
            s = stride_for(t.shape[-1])
            kept[f"{name}@s{s}"] = t[..., ::s, ::s].contiguous()
        else:
            kept[name] = t.contiguous()
    return kept, hashes


def _share_identical(obj, seen: list):
    if isinstance(obj, dict):
        return type(obj)((k, _share_identical(v, seen)) for k, v in obj.items())
    if isinstance(obj, torch.Tensor):
        for other in seen:
            if other.dtype == obj.dtype and other.shape == obj.shape and torch.equal(other, obj):
                return other
        seen.append(obj)
    return obj


def copy_checkpoint(src: Path, dst: Path) -> None:
    original = torch.load(src, map_location="cpu", weights_only=True)
    torch.save(_share_identical(original, []), dst)
    assert _same(torch.load(dst, weights_only=True), original), f"{src}: re-save changed the content"


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def copy_metrics(src: Path, dst: Path) -> None:
    (dst / "cases").mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "cases").glob("*.npz")):
        shutil.copyfile(f, dst / "cases" / f.name)
    for name in METRICS_FILES:
        shutil.copyfile(src / name, dst / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goldens", default=str(ROOT.parent / "shared" / "goldens"))
    parser.add_argument("--methods", nargs="*", default=METHODS + ["metrics"])
    args = parser.parse_args()
    src = Path(args.goldens)
    (OUT / "inputs").mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "inputs").iterdir()):
        shutil.copyfile(f, OUT / "inputs" / f.name)
    (OUT / "clip_tiny").mkdir(exist_ok=True)
    for name in ("tensor_sha256.json", "open_clip_config.json"):
        shutil.copyfile(src / "clip_tiny" / name, OUT / "clip_tiny" / name)
    if "metrics" in args.methods and (src / "metrics").is_dir():
        copy_metrics(src / "metrics", OUT / "metrics")
    for method in args.methods:
        if method == "metrics" or not (src / method).is_dir():
            continue
        dst = OUT / method
        dst.mkdir(exist_ok=True)
        hashes = {}
        for f in sorted((src / method).rglob("*")):
            rel = f.relative_to(src / method)
            if f.suffix == ".safetensors":
                kept, h = compact(load_file(str(f)))
                save_file(kept, str(dst / rel))
                hashes.update({f"{rel}:{k}": v for k, v in h.items()})
            elif f.suffix == ".pth":
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                copy_checkpoint(f, dst / rel)
            elif f.suffix == ".json":
                shutil.copyfile(f, dst / rel)
        (dst / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
