"""The detectron2 config written beside detectron2.pkl names only modules whose weights
are in the pkl, with the sizes the weights have (SoCo FPN with its FPN and 4conv1fc
head; C4 for the others), and every pkl weight belongs to a module the config builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from train.config import load_config
from train.detectron2_config import write_detectron2_config
from train.export import detectron2_state
from train.methods import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _expected(conf: dict, model: dict) -> dict[str, int]:
    """{pkl weight name: output channels} of every module the config builds from the pkl,
    derived from the config alone (detectron2's module names)."""
    m = conf["MODEL"]
    r = m["RESNETS"]
    depth, convs = r["DEPTH"], 3 if r["DEPTH"] >= 50 else 2
    out = {"stem.conv1": r["STEM_OUT_CHANNELS"]}
    channels = r["RES2_OUT_CHANNELS"]
    in_ch = r["STEM_OUT_CHANNELS"]
    for stage, n in enumerate(BLOCKS[depth]):
        c_out = channels * 2 ** stage
        for i in range(n):
            name = f"res{stage + 2}.{i}"
            for k in range(1, convs + 1):
                out[f"{name}.conv{k}"] = c_out if k == convs else (c_out // 4 if convs == 3 else c_out)
            if i == 0 and (stage > 0 or in_ch != c_out):
                out[f"{name}.shortcut"] = c_out
        in_ch = c_out
    if "FPN" in m:
        for f in m["FPN"]["IN_FEATURES"]:
            out[f"fpn_lateral{f[-1]}"] = out[f"fpn_output{f[-1]}"] = m["FPN"]["OUT_CHANNELS"]
        h = m["ROI_BOX_HEAD"]
        out.update({f"box_head.conv{k}": h["CONV_DIM"] for k in range(1, h["NUM_CONV"] + 1)})
        out.update({f"box_head.fc{k}": h["FC_DIM"] for k in range(1, h["NUM_FC"] + 1)})
    return out


@pytest.mark.parametrize("recipe, layout", [("soco_small_cpu", "FPN"), ("mocov2_small_cpu", "C4"),
                                            ("detcon_b_small_cpu", "C4")])
def test_every_module_the_config_names_has_its_weights_in_the_pkl(recipe, layout, tmp_path):
    cfg = load_config(CONFIGS / f"{recipe}.yaml")
    torch.manual_seed(0)
    _, method = build_method(cfg)
    modules = method.export_modules()
    pkl = detectron2_state(modules)["model"]
    path = write_detectron2_config(cfg, modules, tmp_path)
    conf = yaml.safe_load(path.read_text())
    m = conf["MODEL"]
    assert ("FPN" in m) == (layout == "FPN")
    assert m["WEIGHTS"] == str((tmp_path / "detectron2.pkl").resolve())
    assert m["RESNETS"]["NORM"] == "SyncBN" and m["RESNETS"]["STRIDE_IN_1X1"] is False
    assert conf["INPUT"]["FORMAT"] == "RGB" and m["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    expected = _expected(conf, pkl)
    for name, channels in expected.items():
        assert f"{name}.weight" in pkl, name
        assert pkl[f"{name}.weight"].shape[0] == channels, name
        if not name.startswith(("fpn_", "box_head.fc")):           # convs carry a norm (SyncBN)
            assert f"{name}.norm.weight" in pkl or f"{name}.norm.running_var" in pkl, name
    used = {k.rsplit(".", 1)[0].removesuffix(".norm") for k in pkl}
    assert used == set(expected)                                    # nothing in the pkl goes unused
    if layout == "FPN":
        assert m["ROI_BOX_HEAD"]["NUM_CONV"] == 4 and m["ROI_BOX_HEAD"]["NUM_FC"] == 1
        assert m["ROI_BOX_HEAD"]["NORM"] == m["FPN"]["NORM"] == "SyncBN"
    else:
        assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm" and m["RESNETS"]["OUT_FEATURES"] == ["res4"]
