"""Official release layouts of each baseline, written from deterministic weights at tiny sizes (the tests
never download anything): EC's folder, CTSDG's file, SPL/SPN's DDP state_dict, LaMa's Lightning folder and
DDNM's bare U-Net state_dict. Each writer returns the method whose weights it wrote."""
from pathlib import Path

import torch

from bench import create_method

from bench import weights as checkpoints


class ForeignHyperParameters:
    """Stands for the objects a Lightning checkpoint pickles (its config): the safe loader refuses it."""


# ------------------------------------------------------------------ official layouts at tiny sizes
def seeded(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_method(name, **overrides)


def ec_folder(folder: Path, discriminators: bool = True, legacy: bool = False, **overrides):
    """knazeri/edge-connect's release folder (src/models.py BaseModel.save) and its config file. ``legacy``: the
    files as the authors' torch 1.0 wrote them, in the pre-zip serialization format."""
    source = seeded("ec_tiny", **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    for model, prefix in (("edge", "EdgeModel"), ("inpaint", "InpaintingModel")):
        torch.save({"iteration": 7, "generator": getattr(source, f"{model}_generator").state_dict()},
                   folder / f"{prefix}_gen.pth", _use_new_zipfile_serialization=not legacy)
        if discriminators:
            torch.save({"discriminator": getattr(source, f"{model}_discriminator").state_dict()},
                       folder / f"{prefix}_dis.pth", _use_new_zipfile_serialization=not legacy)
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


def lama_folder(folder: Path, name: str = "lama_tiny", discriminator: bool = True, losses: bool = True,
                hyper_parameters=None, **overrides):
    """advimman/lama's release folder: config.yaml + models/best.ckpt (Lightning, with pickled objects).

    The defaults are a training checkpoint; ``discriminator=False, losses=False`` is what the authors publish
    (their make_checkpoint step drops ``discriminator.*`` and ``loss_*``, and the optimiser states).
    ``hyper_parameters``: the pickled config (LaMa's is an OmegaConf DictConfig), a foreign object by default."""
    source = seeded(name, perceptual_network="none", **overrides)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("generator:\n  kind: ffc_resnet\n")
    state = {k: v for k, v in source.state_dict().items() if discriminator or not k.startswith("discriminator.")}
    if losses:
        state["loss_resnet_pl.impl.conv1.weight"] = torch.zeros(4, 3, 3, 3)
    payload = {"epoch": 3, "state_dict": state,
               "hyper_parameters": ForeignHyperParameters() if hyper_parameters is None else hyper_parameters}
    if losses:  # a training checkpoint still has them
        payload["optimizer_states"] = [{"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]}]
    torch.save(payload, folder / "models" / "best.ckpt")
    return source


def ddnm_file(path: Path, **overrides):
    """SDEdit's celeba_hq.ckpt: a bare U-Net state_dict."""
    source = seeded("ddnm_tiny", ema_decay=0.0, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.unet.state_dict(), path)
    return source


# ------------------------------------------------------------------ counting reads
class LoadCounter:
    """Counts ``torch.load`` calls per file (and their ``mmap``) and the streaming hashes of the digest."""

    def __init__(self, monkeypatch):
        self.loads: list[tuple[str, bool]] = []
        self.hashes: list[str] = []
        real_load, real_hash = torch.load, checkpoints.sha256_file

        def load(path, *args, **kwargs):
            self.loads.append((str(path), bool(kwargs.get("mmap"))))
            return real_load(path, *args, **kwargs)

        def digest(path):
            self.hashes.append(str(path))
            return real_hash(path)

        monkeypatch.setattr(torch, "load", load)
        monkeypatch.setattr(checkpoints, "sha256_file", digest)
