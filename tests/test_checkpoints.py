"""Official releases across methods: each method recognises its own layouts (and only those), configures itself
from them, and says in one line what a wrong or broken file is; ``python -m pipelines.weights check`` reports a
folder of releases. Layouts are built from deterministic weights at tiny sizes; paper sizes are checked on
meta-device state_dicts (shapes without memory) through the same inspectors and ``reconfigure``."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from baselines.ctsdg import CTSDG
from baselines.ddnm import DDNM, DDNMConfig, build_unet
from baselines.ec import generator_shape, matching_variant
from baselines.lama import LaMa, official_lama_config
from baselines.spl import SPL, SPN
from bench import create_method
from bench.checkpoints import checkpoint_sha256
from bench.cli import run_main
from bench.errors import CheckpointError
from bench.methods import identify_checkpoint
from bench.weights import file_sha256
from official_layouts import ForeignHyperParameters, ctsdg_file, ddnm_file, ec_folder, lama_folder, seeded, spl_file
from pipelines import weights as weights_cli


def images_and_masks(size: int = 32):
    generator = torch.Generator().manual_seed(11)
    images = torch.rand(1, 3, size, size, generator=generator)
    masks = torch.zeros(1, 1, size, size)
    masks[..., size // 4: size // 2 + 2, size // 3: size - 4] = 1
    return images, masks


# ------------------------------------------------------------------ each layout is claimed by its method only
def test_each_official_layout_is_identified_as_its_own_method_only(tmp_path):
    ec_folder(tmp_path / "ec")
    ctsdg_file(tmp_path / "ctsdg.pt")
    spl_file(tmp_path / "spl.pth")
    spl_file(tmp_path / "spn.pth", name="spn_tiny")
    lama_folder(tmp_path / "lama")
    ddnm_file(tmp_path / "celeba_hq.ckpt")
    expected = {"ec": ("ec_tiny", ("EdgeModel_gen.pth", "EdgeModel_dis.pth", "InpaintingModel_gen.pth",
                                   "InpaintingModel_dis.pth")),
                "ctsdg.pt": ("ctsdg_tiny", ()), "spl.pth": ("spl_tiny", ()), "spn.pth": ("spn_tiny", ()),
                "lama": ("lama_tiny", ("models/best.ckpt",)), "celeba_hq.ckpt": ("ddnm_tiny", ())}
    for name, (variant, files) in expected.items():
        found = identify_checkpoint(tmp_path / name)
        assert [(info.variant, info.format, info.files) for info in found] == [(variant, "official", files)], name
    assert identify_checkpoint(tmp_path / "lama" / "config.yaml", quiet=True) == []


def test_a_release_of_another_method_names_the_method_it_loads_into(tmp_path):
    ec_folder(tmp_path / "ec_release", base_channels=8)  # not the tiny preset's widths: the paper variant ec
    with pytest.raises(CheckpointError) as error:
        create_method("ctsdg").load(tmp_path / "ec_release")
    message = str(error.value)
    assert message == (f"{tmp_path / 'ec_release'}: an EdgeConnect release folder (8 base channels, 2 residual "
                       "blocks), which loads into method ec, not ctsdg")
    ctsdg_file(tmp_path / "ctsdg.pt")
    with pytest.raises(CheckpointError, match=r"a CTSDG release file .*loads into method ctsdg_tiny, not spn_tiny"):
        create_method("spn_tiny").load(tmp_path / "ctsdg.pt")


def test_big_lama_given_to_lama_fourier_says_which_variant_it_is(tmp_path):
    lama_folder(tmp_path / "big-lama", name="lama_tiny", n_blocks=18, ngf=4, disc_ndf=4)
    info = LaMa.inspect_official(tmp_path / "big-lama")
    assert info.variant == "big_lama" and info.release == "a LaMa big-lama release (18 FFC blocks)"
    with pytest.raises(CheckpointError) as error:
        create_method("lama_fourier").load(tmp_path / "big-lama")
    assert str(error.value) == (f"{tmp_path / 'big-lama'}: a LaMa big-lama release (18 FFC blocks), which loads into "
                                "method big_lama (big-LaMa), not lama_fourier (LaMa-Fourier)")
    loaded = create_method("big_lama", perceptual_network="none").load(tmp_path / "big-lama")
    assert loaded.config.n_blocks == 18 and loaded.config.ngf == 4


def test_spl_loads_an_official_file_without_being_told_the_teacher(tmp_path):
    source = spl_file(tmp_path / "places2.pth")
    method = create_method("spl").load(tmp_path / "places2.pth")  # created with the Lite0 teacher, paper size
    assert method.config.teacher == "tresnet_l" and method.name == "spl"
    assert method.num_parameters() == source.num_parameters()  # the file's (tiny) shapes, not the variant's
    images, masks = images_and_masks()
    torch.testing.assert_close(method.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


# ------------------------------------------------------------------ paper sizes, on meta tensors
def inspect_state(monkeypatch, cls, module, state):
    """``cls.inspect_official`` on a file whose payload is ``state`` (meta tensors: shapes only)."""
    monkeypatch.setattr(f"{module}.read_plain_checkpoint", lambda path: state)
    return cls.inspect_official(Path(__file__))  # any existing file: the reader above supplies the payload


@pytest.mark.parametrize("kind, cls, generator_parameters", [("spl", SPL, 45_597_223), ("spn", SPN, 50_702_643)])
def test_paper_size_official_spl_spn_configure_even_a_tiny_variant(monkeypatch, kind, cls, generator_parameters):
    with torch.device("meta"):
        official = create_method(kind, teacher="tresnet_l")
    state = {f"generator.module.{k}": v for k, v in official.generator.state_dict().items()}
    state.update({f"discriminator.module.{k}": v for k, v in official.discriminator.state_dict().items()})
    info = inspect_state(monkeypatch, cls, "baselines.spl", state)
    assert info.variant == kind and info.config["teacher"] == "tresnet_l"
    with torch.device("meta"):
        method = create_method(f"{kind}_tiny")
        method.reconfigure(info.config)
    # counts from instantiating the official classes (docs: baselines.md)
    assert method.num_parameters() == {"generator": generator_parameters, "discriminator": 2_763_776}
    assert method.name == f"{kind}_tiny" and method.config.teacher == "tresnet_l"


def test_paper_size_ec_ctsdg_and_lama_shapes_are_read_as_the_paper_variants(monkeypatch):
    with torch.device("meta"):
        ec, ctsdg, big = (create_method(name) for name in ("ec", "ctsdg", "big_lama"))
    assert generator_shape(ec.edge_generator.state_dict(), Path("EdgeModel_gen.pth")) == (64, 8)
    assert generator_shape(ec.inpaint_generator.state_dict(), Path("InpaintingModel_gen.pth")) == (64, 8)
    assert matching_variant({"base_channels": 64, "residual_blocks": 8}) == "ec"
    info = inspect_state(monkeypatch, CTSDG, "baselines.ctsdg", {
        "n_iter": 1, "generator": ctsdg.generator.state_dict(), "discriminator": ctsdg.discriminator.state_dict()})
    assert info.variant == "ctsdg"
    assert info.config == {"encoder_channels": (64, 128, 256, 512, 512, 512, 512),
                           "encoder_kernels": (7, 5, 5, 3, 3, 3, 3), "preprocessing": "official",
                           "discriminator_channels": 64, "edge_detector_channels": 16}
    state = {f"{name}.{k}": v for name, network in big.networks().items() for k, v in network.state_dict().items()}
    assert official_lama_config(state, Path("best.ckpt")) == {
        "ngf": 64, "n_downsampling": 3, "n_blocks": 18, "ratio_g": 0.75, "max_features": 1024, "disc_ndf": 64,
        "disc_n_layers": 4}


@pytest.mark.parametrize("config, variant, unet_parameters", [
    (DDNMConfig(), "ddnm", 113_673_219),
    (DDNMConfig(network="guided", ch=256, attn_resolutions=(32, 16, 8), head_channels=64), "ddnm_imagenet",
     552_814_086)])
def test_official_ddnm_priors_give_the_official_u_net_to_any_variant(monkeypatch, config, variant, unet_parameters):
    with torch.device("meta"):
        state = build_unet(config).state_dict()
    info = inspect_state(monkeypatch, DDNM, "baselines.ddnm", state)
    assert info.variant == variant and info.networks == ("unet",)
    assert (info.config["image_size"], tuple(info.config["attn_resolutions"])) == (256, tuple(config.attn_resolutions))
    assert info.config["prior"] == "official" and info.config["weights_path"] == str(Path(__file__))
    with torch.device("meta"):
        method = create_method("ddnm_tiny")
        method.reconfigure(info.config)
    assert method.num_parameters() == {"unet": unet_parameters}
    assert method.config.image_size == 256 and method.config.network == config.network
    assert method.config.prior == "official" and "prior" not in method.substitutions


def test_ddnm_prior_file_is_sampled_with_and_not_trained(tmp_path):
    source = ddnm_file(tmp_path / "celeba_hq.ckpt")
    method = create_method("ddnm_tiny").load(tmp_path / "celeba_hq.ckpt")
    assert not method.trainable and method.config.prior == "official"
    assert method.config.weights_path == str(tmp_path / "celeba_hq.ckpt") and "prior" not in method.substitutions
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(method.eps(x, t), source.unet(x, t))


def test_ddnm_file_with_attention_elsewhere_keeps_the_methods_image_size(tmp_path):
    """A layout no preset has: its attention levels count, the image size stays the method's."""
    ddnm_file(tmp_path / "prior.ckpt", image_size=32, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
    info = DDNM.inspect_official(tmp_path / "prior.ckpt")
    assert info.config["attention_levels"] == (1,) and "image_size" not in info.config
    method = create_method("ddnm_tiny").load(tmp_path / "prior.ckpt")  # its image size: 64
    assert method.config.image_size == 64 and tuple(method.config.attn_resolutions) == (32,)
    assert method.config.ch_mult == (1, 2)


# ------------------------------------------------------------------ broken files: one line, never unsafe advice
@pytest.mark.parametrize("name", ["ctsdg_tiny", "spl_tiny", "lama_tiny", "ddnm_tiny", "ec_tiny"])
def test_truncated_and_pickled_files_are_one_line_errors(tmp_path, name):
    ctsdg_file(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(2), "config": ForeignHyperParameters()}, tmp_path / "pickled.pt")
    method = create_method(name)
    for file in ("truncated.pt", "pickled.pt"):
        with pytest.raises(CheckpointError) as error:
            method.load(tmp_path / file)
        message = str(error.value)
        assert message.startswith(str(tmp_path / file)) and "\n" not in message
        assert "weights_only=False" not in message
    if name != "ec_tiny":  # EdgeConnect releases are folders: a lone file is not one of its layouts
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            method.load(tmp_path / "truncated.pt")


def test_a_truncated_file_inside_an_edgeconnect_folder_is_named(tmp_path):
    ec_folder(tmp_path / "ec")
    data = (tmp_path / "ec" / "InpaintingModel_gen.pth").read_bytes()
    (tmp_path / "ec" / "InpaintingModel_gen.pth").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match=r"InpaintingModel_gen\.pth: truncated or corrupted"):
        create_method("ec_tiny").load(tmp_path / "ec")


def test_pickled_file_reason_is_given_where_no_method_claims_it(tmp_path):
    torch.save({"weights": torch.zeros(2), "config": ForeignHyperParameters()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"holds a pickled Python object \(.*ForeignHyperParameters\)"):
        identify_checkpoint(tmp_path / "pickled.pt")


def test_generator_only_lama_release_loads_with_a_warning(tmp_path):
    source = lama_folder(tmp_path / "lama", discriminator=False)
    assert LaMa.inspect_official(tmp_path / "lama").networks == ("generator",)
    with pytest.warns(UserWarning, match="a generator-only release"):
        method = seeded("lama_tiny", 1, perceptual_network="none").load(tmp_path / "lama")
    images, masks = images_and_masks()
    assert torch.equal(method.inpaint(images, masks), source.inpaint(images, masks))


# ------------------------------------------------------------------ python -m pipelines.weights check
def weights_tree(root: Path) -> None:
    """The layout docs/checkpoints.md documents, with tiny releases, plus a file that is no checkpoint."""
    ec_folder(root / "ec" / "celeba")
    ec_folder(root / "ec" / "paris", discriminators=False)
    ctsdg_file(root / "ctsdg" / "places2.pt")
    spl_file(root / "spl" / "paris.pth")
    lama_folder(root / "lama" / "lama-tiny")
    ddnm_file(root / "ddnm" / "celeba_hq.ckpt")
    (root / "README.txt").write_text("downloaded on a Tuesday\n")


def test_weights_check_reports_every_release_once_and_prints_a_weights_block(tmp_path, capsys):
    root = tmp_path / "weights"
    weights_tree(root)
    assert weights_cli.main(["check", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    table, block = out.split("# paste into a benchmark config", 1)
    rows = {line.split()[0]: line.split() for line in table.strip().splitlines()[1:]}
    assert set(rows) == {"README.txt", "ctsdg/places2.pt", "ddnm/celeba_hq.ckpt", "ec/celeba", "ec/paris",
                         "lama/lama-tiny", "spl/paris.pth"}  # folder releases once, never their inner files
    assert rows["ec/celeba"][1:5] == ["ec_tiny", "celeba", "official",
                                      checkpoint_sha256(root / "ec" / "celeba", (
                                          "EdgeModel_gen.pth", "EdgeModel_dis.pth", "InpaintingModel_gen.pth",
                                          "InpaintingModel_dis.pth"))]
    assert rows["ec/paris"][5:] == ["loads", "(generator", "only)"]
    assert rows["ctsdg/places2.pt"][1:6] == ["ctsdg_tiny", "places2", "official",
                                             file_sha256(root / "ctsdg" / "places2.pt"), "loads"]
    assert rows["lama/lama-tiny"][1:3] == ["lama_tiny", "?"]
    assert rows["lama/lama-tiny"][4] == checkpoint_sha256(root / "lama" / "lama-tiny", ("models/best.ckpt",))
    assert rows["ddnm/celeba_hq.ckpt"][1:3] == ["ddnm_tiny", "celeba_hq"]
    assert " ".join(rows["README.txt"][1:]) == "- - - - not a checkpoint sahn-bench reads"
    mapping = yaml.safe_load(block.split("\n", 1)[1])["weights"]
    absolute = root.resolve()
    assert mapping == {"ec_tiny": {"celeba": str(absolute / "ec" / "celeba"), "paris": str(absolute / "ec" / "paris")},
                       "ctsdg_tiny": {"places2": str(absolute / "ctsdg" / "places2.pt")},
                       "spl_tiny": {"paris": str(absolute / "spl" / "paris.pth")},
                       "lama_tiny": str(absolute / "lama" / "lama-tiny"),  # no dataset in its path: every dataset
                       "ddnm_tiny": str(absolute / "ddnm" / "celeba_hq.ckpt")}  # a prior serves every dataset


def test_weights_check_fails_on_a_broken_release_and_names_it(tmp_path, capsys):
    root = tmp_path / "weights"
    ctsdg_file(root / "ctsdg" / "celeba.pt")
    data = (root / "ctsdg" / "celeba.pt").read_bytes()
    (root / "ctsdg" / "paris.pt").write_bytes(data[: len(data) // 3])
    ec_folder(root / "ec" / "places2")
    (root / "ec" / "places2" / "InpaintingModel_gen.pth").unlink()
    assert weights_cli.main(["check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"fails: {root / 'ctsdg' / 'paris.pt'}: truncated or corrupted" in out
    assert f"fails: {root / 'ec' / 'places2'}: an EdgeConnect release folder without InpaintingModel_gen.pth" in out
    block = yaml.safe_load(out.split("# paste into a benchmark config", 1)[1].split("\n", 1)[1])
    assert block == {"weights": {"ctsdg_tiny": {"celeba": str((root / "ctsdg" / "celeba.pt").resolve())}}}


def test_weights_check_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: weights_cli.main(["check", str(tmp_path / "absent")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: weights folder not found: {tmp_path / 'absent'}\n"


def test_weights_check_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        weights_cli.main(["check", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "DIR" in text and "sha256" in text and "weights: block" in text


def test_dataset_is_guessed_from_the_path():
    assert [weights_cli.guess_dataset(p) for p in ("ec/celeba", "ddnm/celeba_hq.ckpt", "CelebA-HQ/x.pt",
                                                   "spl/Paris.pth", "ctsdg/places2.pt", "lama/big-lama",
                                                   "ddnm/imagenet/256x256_diffusion_uncond.pt")] == [
        "celeba", "celeba_hq", "celeba_hq", "paris", "places2", "?", "imagenet"]
    assert json.loads(weights_cli.quoted(Path("/a b/c"))) == "/a b/c"
