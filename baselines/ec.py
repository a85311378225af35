"""EdgeConnect (Nazeri et al., ICCV Workshops 2019) behind the harness's method interface.

Written from the facts of the official code (knazeri/edge-connect @3142579: src/networks.py, src/models.py,
src/edge_connect.py, src/dataset.py, src/loss.py, config.yml.example); module names follow the official
ones, so the released ``EdgeModel_gen.pth`` / ``InpaintingModel_gen.pth`` state_dicts load strictly.

Networks
  G1 ``EdgeGenerator`` and G2 ``InpaintGenerator`` share one layout: ReflPad(3)+conv7 → two stride-2 conv4
  → residual blocks (dilation 2, InstanceNorm) → two stride-2 transposed conv4 → ReflPad(3)+conv7.
  G1: 3 input channels, spectral norm (hook-based, official key names), sigmoid. G2: 4 input channels, no
  spectral norm, (tanh + 1) / 2. Discriminators: :class:`bench.nn.discriminators.PatchDiscriminator` on
  [gray, edges] (D1) and RGB (D2).

Inference (``inpaint``; official test path, src/edge_connect.py ``test`` + src/dataset.py in test mode)
  gray = skimage ``rgb2gray``; edges = skimage ``canny`` (σ 2) on the known pixels only;
  G1 input [gray·(1−m)+m, edges·(1−m), m]; G2 input [image·(1−m)+m, G1's whole edge map]. The test path
  does not merge predicted and known edges, and neither do we. Sizes that are not multiples of 4 (which
  the official code cannot run) are reflect-padded at the bottom/right for the networks and cropped back.

Training (``train_step``; src/models.py ``process``/``backward``, src/edge_connect.py ``train``)
  Ground-truth edges are Canny on the whole image (the official training dataset passes no mask).
  - edge model: D1 nsgan on [gray, edges] vs [gray, G1 output]; G1: adversarial + 10 × feature matching
    (L1 between D1's five activations on fake and real). nsgan is written on logits
    (:mod:`bench.nn.losses`, softplus), which equals the official BCE on sigmoid outputs; the
    discriminators therefore run without their final sigmoid (it has no weights: same state_dict).
  - inpaint model: D2 nsgan on RGB; G2: 0.1 × adversarial + L1 ÷ mean(mask) + 0.1 × perceptual
    (VGG19 relu1_1…relu5_1, L1) + 250 × style (Gram of relu2_2, relu3_4, relu4_4, relu5_2 on the
    hole-masked images). VGG19 sees raw [0,1] images, as in the official loss.py. Offline the VGG19
    weights are unavailable: both losses then use the pretrained EfficientNet-Lite0 substitute
    (stages 0–3 for each loss), recorded in ``substitutions["perceptual"]``.
  - Adam lr 1e-4, betas (0, 0.9); discriminators lr × 0.1. In each model the generator loss uses the
    discriminator *before* its update, as the official step (D backward, D step, G backward, G step)
    did; current PyTorch rejects that order (in-place modification of saved tensors), so both gradients
    are computed first, each only for its own network, then every optimiser steps.

Stages (``EdgeConnectConfig.stage``, the official ``--model`` 1–4)
  ``"edge"`` (1) trains G1/D1; ``"inpaint"`` (2) trains G2/D2 on ground-truth edges; ``"edge_inpaint"``
  (3) trains G2/D2 on G1's predictions merged with the known edges, G1 frozen; ``"joint"`` (4) trains
  both models at once, G2's losses also reaching G1 through the merged edges.
  **Default: "joint"** — the only single stage that trains both generators from scratch, so that a short
  harness run (``ec_tiny``) ends with a usable pipeline; stages 2–3 alone would leave G1 random.
  The official three-stage schedule is three runs, each starting from the previous weights::

      m = create_method("ec", stage="edge");          train(m, ...); m.save("stage1.pt")
      m = create_method("ec", stage="inpaint");       m.load("stage1.pt"); train(m, ...); m.save("stage2.pt")
      m = create_method("ec", stage="edge_inpaint");  m.load("stage2.pt"); train(m, ...)

  The README's stages are ``--model 1, 2, 3``; its third, "the joint model", is ``--model 3``, i.e.
  "edge_inpaint". The paper's final end-to-end fine-tuning (D1 removed, lr 1e-6) is not in the code;
  ``stage="joint", lr=1e-6`` is the nearest setting (it keeps D1's losses).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.run.data_parallel import whole_batch_normaliser
from bench.nn.discriminators import PatchDiscriminator, init_conv_, maybe_spectral_norm
from bench.data.edges import DEFAULT_SIGMA, gray_and_edges
from bench.errors import CheckpointError, UserError
from bench.nn.feature_losses import perceptual_loss, style_loss
from bench.nn.layers import FrozenNetworks
from bench.nn.losses import discriminator_adversarial_loss, generator_adversarial_loss
from bench.methods import InpaintingMethod, apply_overrides, variant
from bench.checkpoint_format import CheckpointInfo, load_state_dict_strict, safe_torch_load
from bench.metrics.pretrained import loss_network
from bench.nn.state_dicts import consecutive_count, tensor_shape, without_prefix

STAGES = ("edge", "inpaint", "edge_inpaint", "joint")
FEATURE_NETWORKS = ("vgg19", "efficientnet_lite0")
PERCEPTUAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
STYLE_LAYERS = ("relu2_2", "relu3_4", "relu4_4", "relu5_2")
#: the two official checkpoint files per model: (generator file, discriminator file)
OFFICIAL_FILES = {"edge": ("EdgeModel_gen.pth", "EdgeModel_dis.pth"),
                  "inpaint": ("InpaintingModel_gen.pth", "InpaintingModel_dis.pth")}
OFFICIAL_FILE_NAMES = tuple(name for files in OFFICIAL_FILES.values() for name in files)
GENERATOR_FILES = tuple(generator for generator, _ in OFFICIAL_FILES.values())
#: both generators downsample twice
SIZE_MULTIPLE = 4
DISCRIMINATOR_LOSSES = ("edge_d", "inpaint_d")


# ===================================================================== configuration
@dataclass
class EdgeConnectConfig:
    """Defaults are the official config.yml.example values and network sizes."""
    # networks (64 channels and 8 residual blocks in the official models)
    base_channels: int = 64
    residual_blocks: int = 8
    discriminator_channels: int = 64
    # edges (SIGMA)
    canny_sigma: float = DEFAULT_SIGMA
    # training
    stage: str = "joint"
    lr: float = 1e-4
    d2g_lr: float = 0.1
    betas: tuple[float, float] = (0.0, 0.9)
    l1_weight: float = 1.0
    fm_weight: float = 10.0
    style_weight: float = 250.0
    content_weight: float = 0.1
    inpaint_adv_weight: float = 0.1
    #: network for the perceptual and style losses: "vgg19" (official; the labelled substitute when its
    #: weights cannot be had) or "efficientnet_lite0" (the substitute, on purpose)
    feature_network: str = "vgg19"
    feature_weights_path: str | None = None


def validate_config(config: EdgeConnectConfig) -> None:
    if config.stage not in STAGES:
        raise UserError(f"EdgeConnect stage={config.stage!r}; choose one of {STAGES}")
    if config.feature_network not in FEATURE_NETWORKS:
        raise UserError(f"EdgeConnect feature_network={config.feature_network!r}; choose one of {FEATURE_NETWORKS}")
    if min(config.base_channels, config.discriminator_channels) < 1 or config.residual_blocks < 0:
        raise UserError("EdgeConnect needs base_channels, discriminator_channels >= 1 and residual_blocks >= 0")


# ===================================================================== generators
def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, track_running_stats=False)


class ResnetBlock(nn.Module):
    """ReflPad(d) + dilated conv3 + IN + ReLU + ReflPad(1) + conv3 + IN, plus the input (no final ReLU)."""

    def __init__(self, channels: int, dilation: int = 2, use_spectral_norm: bool = False):
        super().__init__()

        def conv(conv_dilation: int) -> nn.Module:
            layer = nn.Conv2d(channels, channels, kernel_size=3, dilation=conv_dilation, bias=not use_spectral_norm)
            return maybe_spectral_norm(init_conv_(layer), use_spectral_norm)

        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation), conv(dilation), _instance_norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), conv(1), _instance_norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class EdgeConnectGenerator(nn.Module):
    """The layout both generators share; subclasses apply their output activation to :meth:`logits`.

    Index positions in ``encoder``/``decoder`` are the official ones (``encoder.1``, ``encoder.4``,
    ``encoder.7``, ``decoder.0``, ``decoder.3``, ``decoder.7`` hold the convolutions). The final conv
    never has spectral norm; the others do when ``use_spectral_norm``.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64, residual_blocks: int = 8,
                 use_spectral_norm: bool = False):
        super().__init__()
        widths = (base_channels, 2 * base_channels, 4 * base_channels)

        def normed(layer: nn.Module) -> nn.Module:
            return maybe_spectral_norm(init_conv_(layer), use_spectral_norm)

        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3), normed(nn.Conv2d(in_channels, widths[0], kernel_size=7)),
            _instance_norm(widths[0]), nn.ReLU(True),
            normed(nn.Conv2d(widths[0], widths[1], kernel_size=4, stride=2, padding=1)),
            _instance_norm(widths[1]), nn.ReLU(True),
            normed(nn.Conv2d(widths[1], widths[2], kernel_size=4, stride=2, padding=1)),
            _instance_norm(widths[2]), nn.ReLU(True))
        self.middle = nn.Sequential(*[ResnetBlock(widths[2], 2, use_spectral_norm) for _ in range(residual_blocks)])
        self.decoder = nn.Sequential(
            normed(nn.ConvTranspose2d(widths[2], widths[1], kernel_size=4, stride=2, padding=1)),
            _instance_norm(widths[1]), nn.ReLU(True),
            normed(nn.ConvTranspose2d(widths[1], widths[0], kernel_size=4, stride=2, padding=1)),
            _instance_norm(widths[0]), nn.ReLU(True),
            nn.ReflectionPad2d(3), init_conv_(nn.Conv2d(widths[0], out_channels, kernel_size=7)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.middle(self.encoder(x)))


class EdgeGenerator(EdgeConnectGenerator):
    """G1: [masked gray, masked edges, mask] → edge probability map (spectral norm, sigmoid)."""

    def __init__(self, base_channels: int = 64, residual_blocks: int = 8):
        super().__init__(3, 1, base_channels, residual_blocks, use_spectral_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class InpaintGenerator(EdgeConnectGenerator):
    """G2: [masked RGB (holes white), edge map] → RGB in [0,1] via (tanh + 1) / 2."""

    def __init__(self, base_channels: int = 64, residual_blocks: int = 8):
        super().__init__(4, 3, base_channels, residual_blocks, use_spectral_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.logits(x)) + 1) / 2


def run_padded(network: nn.Module, inputs: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad bottom/right to a multiple of ``multiple``, run, crop back (identity for 256², 64², …)."""
    height, width = inputs.shape[-2:]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    if pad_bottom or pad_right:
        inputs = F.pad(inputs, (0, pad_right, 0, pad_bottom), mode="reflect")
    return network(inputs)[..., :height, :width]


# ===================================================================== host-side inputs (gray and Canny, CPU)
def binary_holes(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Harness masks binarised at 0.5 (1 = hole), as the official code reads its mask files."""
    return (masks > 0.5).to(dtype)


def training_edge_inputs(images: torch.Tensor, masks: torch.Tensor,
                         sigma: float = DEFAULT_SIGMA) -> dict[str, torch.Tensor]:
    """Gray image and Canny edges of the whole images (the official training dataset passes no mask)."""
    gray, edges = gray_and_edges(images, sigma)
    return {"gray": gray, "edges": edges}


def inference_edge_inputs(images: torch.Tensor, masks: torch.Tensor,
                          sigma: float = DEFAULT_SIGMA) -> dict[str, torch.Tensor]:
    """Gray image and Canny edges of the known pixels only (the official test path)."""
    gray, edges = gray_and_edges(images, sigma, binary_holes(masks, images.dtype))
    return {"gray": gray, "edges": edges}


# ===================================================================== losses (src/loss.py, src/models.py)
def discriminator_loss(discriminator: PatchDiscriminator, real: torch.Tensor,
                       fake: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """nsgan (real loss + fake loss) / 2 on a detached fake; also returns D's activations on the real input."""
    real_logits, real_activations = discriminator(real)
    fake_logits, _ = discriminator(fake.detach())
    return discriminator_adversarial_loss(real_logits, fake_logits) / 2, real_activations


def feature_matching_loss(fake_activations: list[torch.Tensor], real_activations: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.l1_loss(fake, real.detach()) for fake, real in zip(fake_activations, real_activations))


# ===================================================================== the method
@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (spectral norm without power iteration) for the block, previous modes restored after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


class EdgeConnect(FrozenNetworks, InpaintingMethod):
    """Two-stage inpainting: G1 completes the Canny edge map, G2 fills the image guided by it."""

    paper_name = "EC"

    def __init__(self, config: EdgeConnectConfig):
        validate_config(config)
        super().__init__(config)
        blocks = (config.base_channels, config.residual_blocks)
        self.edge_generator = EdgeGenerator(*blocks)
        self.inpaint_generator = InpaintGenerator(*blocks)
        # logits out: the nsgan losses apply the sigmoid themselves (see the module doc)
        self.edge_discriminator = PatchDiscriminator(2, False, True, config.discriminator_channels)
        self.inpaint_discriminator = PatchDiscriminator(3, False, True, config.discriminator_channels)
        generator_lr, discriminator_lr = config.lr, config.lr * config.d2g_lr
        self.optimizers = {
            "edge_generator": torch.optim.Adam(self.edge_generator.parameters(), generator_lr, config.betas),
            "edge_discriminator": torch.optim.Adam(self.edge_discriminator.parameters(), discriminator_lr,
                                                   config.betas),
            "inpaint_generator": torch.optim.Adam(self.inpaint_generator.parameters(), generator_lr, config.betas),
            "inpaint_discriminator": torch.optim.Adam(self.inpaint_discriminator.parameters(), discriminator_lr,
                                                      config.betas),
        }
        # The frozen loss network (held by FrozenNetworks, never saved) is built on the first step needing it.
        self._feature_indices: tuple[list[int], list[int]] = ([], [])
        #: ``iteration`` of each official file after :meth:`load_official` ({"edge": n, "inpaint": n})
        self.official_iterations: dict[str, Any] = {}

    def networks(self) -> dict[str, nn.Module]:
        return {"edge_generator": self.edge_generator, "inpaint_generator": self.inpaint_generator,
                "edge_discriminator": self.edge_discriminator, "inpaint_discriminator": self.inpaint_discriminator}

    # ----------------------------------------------------------------- the two generators
    def predict_edges(self, gray: torch.Tensor, edges: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """G1 on [gray·(1−m)+m, edges·(1−m), m] (src/models.py EdgeModel.forward)."""
        inputs = torch.cat((gray * (1 - masks) + masks, edges * (1 - masks), masks), dim=1)
        return run_padded(self.edge_generator, inputs)

    def predict_image(self, images: torch.Tensor, edges: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """G2 on [image·(1−m)+m, edges] (src/models.py InpaintingModel.forward)."""
        inputs = torch.cat((images * (1 - masks) + masks, edges), dim=1)
        return run_padded(self.inpaint_generator, inputs)

    def host_preprocessing(self, purpose: str) -> functools.partial:
        """Gray and Canny by scikit-image on the CPU, where the batch is before it goes to the device: of the
        whole image for training, of the known pixels for :meth:`inpaint`."""
        inputs = training_edge_inputs if purpose == "train" else inference_edge_inputs
        return functools.partial(inputs, sigma=self.config.canny_sigma)

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, gray: torch.Tensor | None = None,
                edges: torch.Tensor | None = None) -> torch.Tensor:
        """``gray`` and ``edges``: what ``host_preprocessing("inpaint")`` made of these images and masks (computed
        here when absent)."""
        masks = binary_holes(masks, images.dtype)
        if gray is None or edges is None:
            gray, edges = gray_and_edges(images, self.config.canny_sigma, masks)
        gray, edges = gray.to(images.device), edges.to(images.device)
        with evaluating(self.edge_generator, self.inpaint_generator), torch.no_grad():
            predicted_edges = self.predict_edges(gray, edges, masks)
            return self.predict_image(images, predicted_edges, masks)

    # ----------------------------------------------------------------- perceptual / style network
    def feature_network(self) -> nn.Module:
        """VGG19 at the union of the perceptual and style layers, or the labelled Lite0 substitute."""
        if "features" not in self.frozen_networks():
            config = self.config
            if config.feature_network == "vgg19":
                layers = tuple(sorted(set(PERCEPTUAL_LAYERS + STYLE_LAYERS), key=_vgg19_depth))
                network, substitution = loss_network("vgg19", layers, config.feature_weights_path)
            else:
                network, _ = loss_network("efficientnet_lite0", ())
                substitution = f"{network.name} ({network.provenance}) instead of vgg19, as configured"
            if substitution is None:
                # official loss.py feeds VGG19 the raw [0,1] images, without ImageNet mean/std
                network.mean.zero_()
                network.std.fill_(1.0)
                self._feature_indices = ([layers.index(n) for n in PERCEPTUAL_LAYERS],
                                         [layers.index(n) for n in STYLE_LAYERS])
            else:
                self.substitutions["perceptual"] = f"perceptual and style losses on {substitution}"
                every_stage = list(range(len(network.taps)))
                self._feature_indices = (every_stage, every_stage)
            self.hold_frozen("features", network.to(self.device))
        return self.frozen("features")

    def feature_losses(self, predicted: torch.Tensor, images: torch.Tensor,
                       masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Perceptual loss on the whole images, style loss on the hole-masked ones (one batched pass each side)."""
        network = self.feature_network()
        batch = len(predicted)
        fake = network(torch.cat((predicted, predicted * masks)))
        with torch.no_grad():
            real = network(torch.cat((images, images * masks)))
        perceptual_indices, style_indices = self._feature_indices
        perceptual = perceptual_loss([fake[i][:batch] for i in perceptual_indices],
                                     [real[i][:batch] for i in perceptual_indices])
        style = style_loss([fake[i][batch:] for i in style_indices], [real[i][batch:] for i in style_indices])
        return perceptual, style

    # ----------------------------------------------------------------- training
    def edge_losses(self, gray: torch.Tensor, edges: torch.Tensor,
                    masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """src/models.py EdgeModel.process: returns G1's output and the named losses."""
        predicted = self.predict_edges(gray, edges, masks)
        fake = torch.cat((gray, predicted), dim=1)
        d_loss, real_activations = discriminator_loss(self.edge_discriminator, torch.cat((gray, edges), dim=1), fake)
        fake_logits, fake_activations = self.edge_discriminator(fake)
        return predicted, {
            "edge_d": d_loss,
            "edge_g_adv": generator_adversarial_loss(fake_logits),
            "edge_g_fm": feature_matching_loss(fake_activations, real_activations) * self.config.fm_weight,
        }

    def inpaint_losses(self, images: torch.Tensor, edges: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """src/models.py InpaintingModel.process: the named losses of G2 and D2."""
        config = self.config
        predicted = self.predict_image(images, edges, masks)
        d_loss, _ = discriminator_loss(self.inpaint_discriminator, images, predicted)
        fake_logits, _ = self.inpaint_discriminator(predicted)
        perceptual, style = self.feature_losses(predicted, images, masks)
        return {
            "inpaint_d": d_loss,
            "inpaint_g_adv": generator_adversarial_loss(fake_logits) * config.inpaint_adv_weight,
            # the official normaliser, the batch's hole fraction: the whole global batch's with several workers
            "inpaint_g_l1": F.l1_loss(predicted, images) * config.l1_weight / whole_batch_normaliser(masks.mean()),
            "inpaint_g_perceptual": perceptual * config.content_weight,
            "inpaint_g_style": style * config.style_weight,
        }

    def stage_losses(self, images: torch.Tensor, masks: torch.Tensor, gray: torch.Tensor | None = None,
                     edges: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The losses of ``config.stage`` (src/edge_connect.py ``train``, models 1–4). ``gray`` and ``edges``:
        :func:`training_edge_inputs` of the images, made on the host by the training loop (else here)."""
        stage = self.config.stage
        if gray is None or edges is None:
            gray, edges = gray_and_edges(images, self.config.canny_sigma)  # training edges: the whole image
        gray, edges = gray.to(images.device), edges.to(images.device)
        losses: dict[str, torch.Tensor] = {}
        if stage in ("edge", "joint"):
            predicted_edges, losses = self.edge_losses(gray, edges, masks)
        if stage == "edge":
            return losses
        if stage == "inpaint":
            guide = edges
        elif stage == "edge_inpaint":
            with torch.no_grad():
                guide = self.predict_edges(gray, edges, masks) * masks + edges * (1 - masks)
        else:  # joint: not detached, so G2's losses also train G1 (as the official joint model)
            guide = predicted_edges * masks + edges * (1 - masks)
        return {**losses, **self.inpaint_losses(images, guide, masks)}

    def trained_models(self) -> tuple[str, ...]:
        return {"edge": ("edge",), "inpaint": ("inpaint",), "edge_inpaint": ("inpaint",),
                "joint": ("edge", "inpaint")}[self.config.stage]

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step of ``config.stage``: discriminator and generator gradients first, then every update."""
        self.train()
        images = batch["image"].to(self.device)
        masks = binary_holes(batch["mask"].to(self.device), images.dtype)
        models = self.trained_models()
        optimizer_names = [f"{m}_{role}" for m in models for role in ("generator", "discriminator")]
        for name in optimizer_names:
            self.optimizers[name].zero_grad(set_to_none=True)
        losses = self.stage_losses(images, masks, batch.get("gray"), batch.get("edges"))
        discriminator_total = sum(v for k, v in losses.items() if k in DISCRIMINATOR_LOSSES)
        generator_total = sum(v for k, v in losses.items() if k not in DISCRIMINATOR_LOSSES)
        self.backward(discriminator_total)
        # G's adversarial terms went through D: only G's parameters receive this gradient (D's came from its own loss)
        generator_parameters = [p for m in models for p in getattr(self, f"{m}_generator").parameters()]
        self.backward(generator_total, inputs=generator_parameters)
        for name in optimizer_names:
            self.step(name)
        return {name: value.detach() for name, value in losses.items()}

    # ----------------------------------------------------------------- official checkpoints
    @classmethod
    def inspect_official(cls, path: Path) -> CheckpointInfo | None:
        """An official release folder (``EdgeModel_gen.pth`` and ``InpaintingModel_gen.pth``, optionally the two
        ``*_dis.pth``), read without building a network: the widths and block count come from its tensors.
        A folder holding some of the official files but not both generators is a broken release (error); a
        single official file is an error that names its folder; anything else is not an EdgeConnect release."""
        path = Path(path)
        if path.is_file():
            if path.name in OFFICIAL_FILE_NAMES:
                raise CheckpointError(f"{path}: one file of an EdgeConnect release; load the folder that holds it "
                                      f"({path.parent}), which needs {' and '.join(GENERATOR_FILES)}")
            return None
        present = [name for name in OFFICIAL_FILE_NAMES if (path / name).is_file()]
        if not present:
            return None
        missing = [name for name in GENERATOR_FILES if name not in present]
        if missing:
            raise CheckpointError(f"{path}: an EdgeConnect release folder without {' and '.join(missing)} "
                                  f"(it needs {' and '.join(GENERATOR_FILES)}; the *_dis.pth files are optional)")
        generators = {model: read_official_state(path / files[0], "generator")[0]
                      for model, files in OFFICIAL_FILES.items()}
        discriminators = {model: read_official_state(path / files[1], "discriminator")[0]
                          for model, files in OFFICIAL_FILES.items() if files[1] in present}
        shapes = {model: generator_shape(state, path / OFFICIAL_FILES[model][0]) for model, state in generators.items()}
        if shapes["edge"] != shapes["inpaint"]:
            raise CheckpointError(f"{path}: its edge generator has (channels, residual blocks) {shapes['edge']} "
                                  f"and its inpainting generator {shapes['inpaint']}; the harness builds both alike")
        base_channels, residual_blocks = shapes["edge"]
        config: dict[str, Any] = {"base_channels": base_channels, "residual_blocks": residual_blocks}
        variant_name = matching_variant(config)
        widths = {int(tensor_shape(state, "conv1.0.weight_orig", path / OFFICIAL_FILES[model][1],
                                   "an EdgeConnect discriminator")[0]) for model, state in discriminators.items()}
        if len(widths) > 1:
            raise CheckpointError(f"{path}: its two discriminators have different widths {sorted(widths)}; the harness "
                                  "builds both alike")
        # without a discriminator file the width is the one of the variant the generators match
        config["discriminator_channels"] = (widths.pop() if widths
                                            else VARIANT_CONFIGS[variant_name].discriminator_channels)
        networks = tuple(f"{model}_generator" for model in generators) + tuple(
            f"{model}_discriminator" for model in discriminators)
        return CheckpointInfo(
            variant=variant_name, format="official", config=config, networks=networks,
            files=tuple(name for name in OFFICIAL_FILE_NAMES if name in present),
            release=f"an EdgeConnect release folder ({base_channels} base channels, {residual_blocks} residual blocks"
                    + ("" if discriminators else ", generators only") + ")")

    def load_official(self, path: Path) -> None:
        """The official checkpoint folder: ``EdgeModel_gen.pth`` and ``InpaintingModel_gen.pth`` (each
        ``{'generator': state_dict, 'iteration': n}``), loaded strictly; ``*_dis.pth`` too when present."""
        path = Path(path)
        generator_files = [path / generator for generator, _ in OFFICIAL_FILES.values()]
        if not path.is_dir() or not all(f.is_file() for f in generator_files):
            raise CheckpointError(f"{path}: neither a sahn-bench checkpoint nor an EdgeConnect checkpoint folder "
                                  f"(a folder with {' and '.join(f.name for f in generator_files)})")
        for model, (generator_file, discriminator_file) in OFFICIAL_FILES.items():
            state, payload = read_official_state(path / generator_file, "generator")
            load_state_dict_strict(getattr(self, f"{model}_generator"), state, what=str(path / generator_file))
            self.official_iterations[model] = payload.get("iteration")
            if (path / discriminator_file).is_file():
                state, _ = read_official_state(path / discriminator_file, "discriminator")
                load_state_dict_strict(getattr(self, f"{model}_discriminator"), state,
                                       what=str(path / discriminator_file))


def read_official_state(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``payload[key]`` of an official file (weights_only), without the ``module.`` prefix that
    ``nn.DataParallel`` adds when the official code trains on several GPUs (edge-connect issues #88, #121)."""
    payload = safe_torch_load(path)
    state = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected an EdgeConnect file holding {{'{key}': state_dict, ...}}")
    return without_prefix(state, "module."), payload


def generator_shape(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(base channels, residual blocks) of an official generator state_dict: the first conv's output width
    (``weight_orig`` under G1's spectral norm) and the number of ``middle.N`` blocks."""
    key = "encoder.1.weight_orig" if "encoder.1.weight_orig" in state else "encoder.1.weight"
    return int(tensor_shape(state, key, path, "an EdgeConnect generator")[0]), consecutive_count(state, "middle.")


def matching_variant(shapes: dict[str, Any]) -> str:
    """The variant whose preset has these shapes (``ec_tiny`` for CPU-sized files), else the paper's ``ec``."""
    for name, config in VARIANT_CONFIGS.items():
        if all(getattr(config, field) == value for field, value in shapes.items()):
            return name
    return "ec"


def _vgg19_depth(layer: str) -> tuple[int, int]:
    block, index = layer.removeprefix("relu").split("_")
    return int(block), int(index)


# ===================================================================== variants
#: CPU-sized: 16 base channels (64 at the residual blocks), 2 residual blocks, 16-channel discriminators;
#: trained at 64², batch 8 by the harness's default preset
TINY = EdgeConnectConfig(base_channels=16, residual_blocks=2, discriminator_channels=16)
#: each variant's preset, for telling which one an official folder's shapes belong to
VARIANT_CONFIGS = {"ec": EdgeConnectConfig(), "ec_tiny": TINY}


@variant(scale="paper", paper_name="EC", method_class=EdgeConnect, paper_column=2)
def ec(**overrides: Any) -> EdgeConnect:
    """The official sizes: G1 10,761,089, G2 10,774,595, D1 2,762,752, D2 2,763,776 parameters."""
    return EdgeConnect(apply_overrides(EdgeConnectConfig(), overrides))


@variant(scale="tiny", paper_name="EC", method_class=EdgeConnect)
def ec_tiny(**overrides: Any) -> EdgeConnect:
    """CPU-sized EdgeConnect: the official layout, inference path and losses with fewer channels and blocks."""
    return EdgeConnect(apply_overrides(TINY, overrides))
