"""Official release layouts of each baseline, written from deterministic weights at tiny sizes (the tests
never download anything): EC's folder, CTSDG's file, SPL/SPN's DDP state_dict, LaMa's Lightning folder and
DDNM's bare U-Net state_dict. Each writer returns the method whose weights it wrote."""
from pathlib import Path

import torch

from bench import create_method


class ForeignHyperParameters:
    """Stands for the objects a Lightning checkpoint pickles (its config): the safe loader refuses it."""


# ------------------------------------------------------------------ official layouts at tiny sizes
def seeded(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_method(name, **overrides)


def ec_folder(folder: Path, discriminators: bool = True, **overrides):
    """knazeri/edge-connect's release folder (src/models.py BaseModel.save) and its config file."""
    source = seeded("ec_tiny", **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    for model, prefix in (("edge", "EdgeModel"), ("inpaint", "InpaintingModel")):
        torch.save({"iteration": 7, "generator": getattr(source, f"{model}_generator").state_dict()},
                   folder / f"{prefix}_gen.pth")
        if discriminators:
            torch.save({"discriminator": getattr(source, f"{model}_discriminator").state_dict()},
                       folder / f"{prefix}_dis.pth")
    (folder / "config.yml").write_text("MODE: 2\nMODEL: 3\n")
    return source


def ctsdg_file(path: Path, seed: int = 0, **overrides):
    """xiefan-guo/ctsdg trainer.py: {'n_iter', 'generator', 'discriminator'}."""
    source = seeded("ctsdg_tiny", seed, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"n_iter": 300000, "generator": source.generator.state_dict(),
                "discriminator": source.discriminator.state_dict()}, path)
    return source


def spl_file(path: Path, name: str = "spl_tiny", **overrides):
    """WendongZh/SPL main.py checkpoint(): InpaintingModel.state_dict() under DDP, with the TResNet teacher."""
    source = seeded(name, teacher="tresnet_l", **overrides)
    payload = {f"generator.module.{k}": v for k, v in source.generator.state_dict().items()}
    payload.update({f"discriminator.module.{k}": v for k, v in source.discriminator.state_dict().items()})
    payload["tresnet_xL_hold.body.conv1.0.weight"] = torch.zeros(76, 48, 3, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return source


def lama_folder(folder: Path, name: str = "lama_tiny", discriminator: bool = True, **overrides):
    """advimman/lama's release folder: config.yaml + models/best.ckpt (Lightning, with pickled objects)."""
    source = seeded(name, perceptual_network="none", **overrides)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("generator:\n  kind: ffc_resnet\n")
    state = {k: v for k, v in source.state_dict().items() if discriminator or not k.startswith("discriminator.")}
    state["loss_resnet_pl.impl.conv1.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": ForeignHyperParameters()},
               folder / "models" / "best.ckpt")
    return source


def ddnm_file(path: Path, **overrides):
    """SDEdit's celeba_hq.ckpt: a bare U-Net state_dict."""
    source = seeded("ddnm_tiny", ema_decay=0.0, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.unet.state_dict(), path)
    return source
