"""Which network the distance statistic runs through: finding its weights, naming it,
building it.

`resolve(spec, weights, random_weights)` turns what the user typed (`make stats
BACKBONE=...`, `--backbone`) into a `Backbone`: a small, picklable record (what it is, where
its files are, their sha256) that goes to Ray actors and into every part's
`params["stats"]["backbone"]`; `build(backbone)` makes the network there. Accepted specs:

- empty / `torchvision` / `resnet50`: torchvision's supervised ResNet-50 (IMAGENET1K_V1),
  the paper's statistic and the default; file `resnet50-0676ba61.pth` from `WEIGHTS`,
  else the torch hub cache;
- a run folder of ours (`work/pretrain/<run>`), its `exported/backbone_torchvision.pth`, or
  its `checkpoints/last.pt`: the architecture and width come from the run's
  `checkpoints/config.yaml`; an export loads into `train.models.backbone.build_backbone`, a
  checkpoint into the method (`train.methods.build_method(cfg)`), whose
  `export_modules()["backbone"]` is the network (prefer the export when a folder has both);
- `timm:<name>` with `WEIGHTS=<local file>` (.pth / .bin / .safetensors): timm builds
  `<name>` without its classifier and loads that file; nothing is downloaded.

Every backbone gives one pooled vector per view: a ResNet's last feature map (conv5)
averaged over positions, a timm model its own pooled pre-logits output (average pool or the
class token, as the model defines). `random` (tests only) is torchvision's ResNet-50 with
seeded random weights; its figures are marked not meaningful.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

from common.io import sha256_file

WEIGHTS_NAME = "resnet50-0676ba61.pth"
WEIGHTS_URL = f"https://download.pytorch.org/models/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "0676ba61"  # torchvision names its files by this prefix of the sha256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_NAMES = ("", "torchvision", "resnet50", "supervised")
EXPORT_FILE = "backbone_torchvision.pth"


class MissingWeightsError(FileNotFoundError):
    pass


class BackboneError(ValueError):
    """A BACKBONE= that cannot be used; the message says why and what to pass instead."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    kind: str                  # torchvision | random | export | checkpoint | timm
    name: str                  # label in the report, e.g. "torchvision resnet50 (IMAGENET1K_V1)"
    path: str | None = None    # weights / export / checkpoint file
    sha256: str | None = None
    config: str | None = None  # the run's config.yaml (export, checkpoint)
    arch: str | None = None    # resnet18 / resnet50 / a timm model name
    width: int | None = None   # our ResNets' base width
    init_seed: int = 0         # random only

    @property
    def meaningful(self) -> bool:
        return self.kind != "random"

    @property
    def is_paper_statistic(self) -> bool:
        """True for the network MaskCo's Table 1 used (comparable to the paper's values)."""
        return self.kind == "torchvision"

    def record(self) -> dict:
        """What the parts store under params["stats"]["backbone"]."""
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "arch": self.arch,
                "width": self.width, "file": None if self.path is None else Path(self.path).name}


def identity(record: dict | None) -> str:
    """A short label that differs whenever the network differs (name + sha256 prefix)."""
    if not record:
        return "unknown backbone"
    digest = record.get("sha256")
    return record["name"] + (f" · sha256 {digest[:12]}" if digest else "")


def record_of(stats_params: dict) -> dict:
    """The backbone record of a part's params["stats"]; parts written before backbones
    were recorded name only the weights file (random or torchvision's ResNet-50)."""
    if stats_params.get("backbone"):
        return stats_params["backbone"]
    if stats_params.get("weights") == "random":
        return random_backbone().record()
    return {"kind": "torchvision", "name": TORCHVISION_LABEL, "sha256": stats_params.get("weights_sha256"),
            "arch": "resnet50", "width": 64, "file": stats_params.get("weights")}


TORCHVISION_LABEL = "torchvision resnet50 (IMAGENET1K_V1, supervised)"


# ---------------------------------------------------------------- torchvision's ResNet-50
def default_weights_path() -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def find_weights(explicit: str | os.PathLike | None = None) -> Path:
    """The weights file: `explicit`, else $WEIGHTS, else the torch hub cache. Raises
    MissingWeightsError saying what to download and where to put it."""
    chosen = explicit or os.environ.get("WEIGHTS")
    path = Path(chosen) if chosen else default_weights_path()
    if path.is_file():
        return path
    where = (f"WEIGHTS={chosen} does not exist" if chosen
             else f"{path} does not exist (torch hub cache; TORCH_HOME moves it)")
    raise MissingWeightsError(
        f"ResNet-50 weights not found: {where}. The ResNet distance needs torchvision's "
        f"supervised ImageNet ResNet-50 (IMAGENET1K_V1), file {WEIGHTS_NAME}. On a machine "
        f"with internet: `curl -L -o {WEIGHTS_NAME} {WEIGHTS_URL}`, then copy it to "
        f"{default_weights_path()} or pass WEIGHTS=/path/to/{WEIGHTS_NAME}. "
        "(--random-weights runs the code path for tests only; its numbers mean nothing.)")


def weights_available(explicit=None) -> bool:
    try:
        find_weights(explicit)
        return True
    except MissingWeightsError:
        return False


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """Hash a 100 MB weights file once per process (the driver asks more than once)."""
    return sha256_file(path)


def file_sha256(path: str | os.PathLike) -> str:
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def random_backbone(init_seed: int = 0) -> Backbone:
    return Backbone("random", "random resnet50 (TEST ONLY, not meaningful)", arch="resnet50",
                    width=64, init_seed=init_seed)


def torchvision_backbone(weights=None) -> Backbone:
    path = find_weights(weights)
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        print(f"warning: {path} is not torchvision's {WEIGHTS_NAME} (sha256 {digest[:12]}...); "
              "distances will not be comparable to the paper's Table 1", file=sys.stderr)
    return Backbone("torchvision", TORCHVISION_LABEL, str(path), digest, arch="resnet50", width=64)


# ---------------------------------------------------------------- resolve a BACKBONE= spec
def resolve(spec: str | None = None, weights: str | None = None,
            random_weights: bool = False) -> Backbone:
    """The Backbone a user means by `spec` (see the module doc); raises MissingWeightsError
    or BackboneError with the fix."""
    spec = (spec or "").strip()
    if random_weights:
        if spec.lower() not in DEFAULT_NAMES:
            raise BackboneError("--random-weights replaces torchvision's ResNet-50 only; drop "
                                f"BACKBONE={spec} or --random-weights")
        return random_backbone()
    if spec.lower() in DEFAULT_NAMES:
        return torchvision_backbone(weights)
    if spec.startswith("timm:"):
        return _timm_backbone(spec[len("timm:"):], weights)
    path = Path(spec)
    if not path.exists():
        raise BackboneError(
            f"BACKBONE={spec}: no such file or folder. Pass a run folder of ours "
            "(work/pretrain/<run>), its exported/backbone_torchvision.pth or "
            "checkpoints/last.pt, `timm:<model name>` with WEIGHTS=<local weights file>, or "
            "leave it empty for torchvision's supervised ResNet-50")
    if path.is_dir():
        export, last = path / "exported" / EXPORT_FILE, path / "checkpoints" / "last.pt"
        if export.is_file():
            path = export
        elif last.is_file():
            path = last
        else:
            raise BackboneError(f"BACKBONE={spec}: the folder has neither {export.relative_to(path)} "
                                f"nor {last.relative_to(path)}; run `make pretrain` (it exports at "
                                "the end) or `python -m train.export --checkpoint .../last.pt`")
    config = _run_config(path)
    cfg = _read_config(config)
    model = cfg.get("model") or {}
    arch, width = model.get("backbone", "resnet50"), int(model.get("width", 64))
    run_name = config.parent.parent.name
    kind = "checkpoint" if path.suffix == ".pt" else "export"
    label = f"ours: {run_name} {cfg.get('method', '?')} {arch} w{width} ({kind} {path.name})"
    return Backbone(kind, label, str(path), file_sha256(path), str(config), arch, width)


def _run_config(path: Path) -> Path:
    """checkpoints/config.yaml of the run a weights file belongs to."""
    for candidate in (path.parent / "config.yaml", path.parent.parent / "checkpoints" / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise BackboneError(f"BACKBONE={path}: cannot find the run's checkpoints/config.yaml (beside "
                        "the file, or in ../checkpoints/); it names the architecture and width. "
                        "Keep the run folder together (checkpoints/ and exported/)")


def _read_config(path: Path) -> dict:
    from train.config import load_config
    try:
        return load_config(path)
    except Exception as e:  # a broken config: say which file
        raise BackboneError(f"{path}: cannot read the run's config ({type(e).__name__}: {e})") from None


def _timm_backbone(name: str, weights: str | None) -> Backbone:
    _import_timm()
    chosen = weights or os.environ.get("WEIGHTS")
    if not name:
        raise BackboneError("BACKBONE=timm:<model name>, e.g. timm:resnet50.a1_in1k")
    if not chosen or not Path(chosen).is_file():
        raise BackboneError(
            f"BACKBONE=timm:{name} needs WEIGHTS=<local weights file> (.pth, .bin or "
            f".safetensors of that model){'; ' + chosen + ' does not exist' if chosen else ''}. "
            "Nothing is downloaded here: fetch the file where there is internet (e.g. from the "
            "model's Hugging Face page) and pass its path")
    return Backbone("timm", f"timm {name} ({Path(chosen).name})", str(chosen), file_sha256(chosen),
                    arch=name)


def _import_timm():
    try:
        import timm
    except ImportError:
        raise BackboneError("BACKBONE=timm:... needs the timm package: `.venv/bin/pip install "
                            "timm==1.0.31` (the version in requirements.txt)") from None
    return timm


# ---------------------------------------------------------------- build the network
@dataclasses.dataclass
class Network:
    """The built backbone: `pooled(x)` maps ImageNet-style normalised NCHW float views to
    [N, D] pooled features; mean/std (0..1 scale) are what the inputs are normalised with."""
    module: object
    pooled: object
    mean: tuple
    std: tuple


def build(backbone: Backbone) -> Network:
    import torch
    if backbone.kind in ("torchvision", "random"):
        import torchvision
        if backbone.kind == "random":
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
                torch.manual_seed(backbone.init_seed)
                net = torchvision.models.resnet50(weights=None)
        else:
            net = torchvision.models.resnet50(weights=None)
            _load(net, backbone.path, "a loadable torchvision ResNet-50 state dict",
                  f"Download it again from {WEIGHTS_URL}.")
        trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                    net.layer1, net.layer2, net.layer3, net.layer4)
        return Network(net, lambda x: trunk(x).mean(dim=(2, 3)), IMAGENET_MEAN, IMAGENET_STD)
    if backbone.kind == "export":
        from train.models.backbone import build_backbone
        net = build_backbone(backbone.arch, width=backbone.width)
        _load(net, backbone.path, f"an export of a {backbone.arch} (width {backbone.width}) as "
              f"its config {backbone.config} says", "Export it again with `python -m train.export`.")
        return Network(net, net, IMAGENET_MEAN, IMAGENET_STD)  # ResNet.forward = pooled conv5
    if backbone.kind == "checkpoint":
        from train.methods import build_method
        _, method = build_method(_read_config(Path(backbone.config)))
        state = _torch_load(backbone.path)
        if not isinstance(state, dict) or "model" not in state:
            raise BackboneError(f"{backbone.path}: not a checkpoint of ours (no 'model' entry)")
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as e:
            raise BackboneError(f"{backbone.path}: does not match the method its config "
                                f"{backbone.config} builds ({str(e)[:300]})") from None
        net = method.export_modules()["backbone"]
        return Network(net, net, IMAGENET_MEAN, IMAGENET_STD)
    if backbone.kind == "timm":
        timm = _import_timm()
        try:
            net = timm.create_model(backbone.arch, pretrained=True, num_classes=0,
                                    pretrained_cfg_overlay={"file": backbone.path})
        except Exception as e:  # unknown name, file of another model
            raise BackboneError(f"timm could not build {backbone.arch!r} from {backbone.path} "
                                f"({type(e).__name__}: {str(e)[:300]}); check the model name "
                                "(timm.list_models) and that the file holds its weights") from None
        cfg = net.pretrained_cfg or {}
        return Network(net, net, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    raise BackboneError(f"unknown backbone kind {backbone.kind!r}")


def _torch_load(path):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, not a torch file
        raise MissingWeightsError(f"{path}: not a loadable weights file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from e


def _load(net, path, what: str, fix: str) -> None:
    state = _torch_load(path)
    try:
        net.load_state_dict(state)
    except Exception as e:  # other architecture or width
        raise MissingWeightsError(f"{path}: not {what} ({str(e)[:300]}). {fix}") from e
