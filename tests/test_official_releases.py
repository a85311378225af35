"""Official releases across methods: each method recognises its own layouts (and only those), configures itself
from them, and says in one line what a wrong or broken file is; ``python -m pipelines.weights check`` reports a
folder of releases. Layouts are built from deterministic weights at tiny sizes; paper sizes are checked on
meta-device state_dicts (shapes without memory) through the same inspectors and ``reconfigure``."""
import json
import os
import re
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from baselines.ctsdg import CTSDG
from baselines.ddnm import DDNM, DDNMConfig, build_unet
from baselines.ec import generator_shape, matching_variant
from baselines.lama import InertObject, LaMa, load_checkpoint_inertly, official_lama_config
from baselines.spl import SPL, SPN
from bench import create_method
from bench.weights import checkpoint_sha256
from bench.cli import parse_config, run_main
from bench.config import BenchmarkConfig
from bench.errors import CheckpointError
from bench.methods import identify_checkpoint
from bench.checkpoint_format import checkpoint_reads, is_zip_checkpoint, safe_torch_load
from bench.files import sha256_file
from official_layouts import (ForeignHyperParameters, LoadCounter, ctsdg_file, ddnm_file, ec_folder, lama_folder,
                              seeded, spl_file)
from pipelines import weights as weights_cli
from pipelines.full_benchmark import PRESETS, check_weights, resolve_methods


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
    # counts from instantiating the official classes (docs/official-sources.md)
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
    rows = {line.split()[0]: line.split() for line in table.strip().splitlines()[1:] if not line.startswith("#")}
    note = " ".join(line.lstrip("# ") for line in table.splitlines() if line.startswith("#"))
    # what "generator only" means, for whoever reads the table: no discriminator, LaMa's releases, fine-tuning
    assert "loads (generator only): the release holds no discriminator weights" in note
    assert "fine-tuning it starts the discriminator from scratch" in note
    assert "make_checkpoint" not in note  # no LaMa release is generator-only here
    assert set(rows) == {"README.txt", "ctsdg/places2.pt", "ddnm/celeba_hq.ckpt", "ec/celeba", "ec/paris",
                         "lama/lama-tiny", "spl/paris.pth"}  # folder releases once, never their inner files
    assert rows["ec/celeba"][1:5] == ["ec_tiny", "celeba", "official",
                                      checkpoint_sha256(root / "ec" / "celeba", (
                                          "EdgeModel_gen.pth", "EdgeModel_dis.pth", "InpaintingModel_gen.pth",
                                          "InpaintingModel_dis.pth"))]
    assert rows["ec/paris"][5:] == ["loads", "(generator", "only)"]
    assert rows["ctsdg/places2.pt"][1:6] == ["ctsdg_tiny", "places2", "official",
                                             sha256_file(root / "ctsdg" / "places2.pt"), "loads"]
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


# ------------------------------------------------------------------ one read per release (issue 26, item 4)
def one_release(kind: str, root: Path) -> Path:
    writers = {"ddnm": lambda: ddnm_file(root / "celeba_hq.ckpt"), "ctsdg": lambda: ctsdg_file(root / "celeba.pt"),
               "spl": lambda: spl_file(root / "paris.pth"), "lama": lambda: lama_folder(root / "lama-fourier")}
    writers[kind]()
    return next(p for p in root.iterdir())


@pytest.mark.parametrize("kind", ["ddnm", "ctsdg", "spl", "lama"])
def test_weights_check_of_one_release_reads_it_at_most_twice_and_hashes_it_once(tmp_path, monkeypatch, capsys,
                                                                                kind):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached prior read by DDNM's constructor
    release = one_release(kind, tmp_path / "weights")
    counter = LoadCounter(monkeypatch)
    assert weights_cli.main(["check", str(tmp_path / "weights"), "--no-progress"]) == 0
    assert "loads" in capsys.readouterr().out
    # identification asks every method class and loading inspects again: all from one read (LaMa: a refused
    # plain read, then the one with inert stand-ins), memory-mapped
    limit = 2 if kind == "lama" else 1
    assert 1 <= len(counter.loads) <= limit, counter.loads
    assert all(mmap for _, mmap in counter.loads)
    checkpoint = release / "models" / "best.ckpt" if release.is_dir() else release
    assert counter.hashes == [str(checkpoint)]


def test_an_edgeconnect_folder_is_read_once_per_file(tmp_path, monkeypatch, capsys):
    ec_folder(tmp_path / "weights" / "ec" / "celeba")
    counter = LoadCounter(monkeypatch)
    assert weights_cli.main(["check", str(tmp_path / "weights"), "--no-progress"]) == 0
    files = [path for path, _ in counter.loads]
    assert len(files) == 4 and len(set(files)) == 4 and sorted(counter.hashes) == sorted(files)


def test_loading_inspects_and_loads_from_one_read(tmp_path, monkeypatch):
    ctsdg_file(tmp_path / "celeba.pt")
    counter = LoadCounter(monkeypatch)
    create_method("ctsdg_tiny").load(tmp_path / "celeba.pt")
    assert counter.loads == [(str(tmp_path / "celeba.pt"), True)]
    create_method("ctsdg_tiny").load(tmp_path / "celeba.pt")  # a read is shared within one load only
    assert len(counter.loads) == 2


def test_a_file_replaced_inside_a_read_scope_is_read_again(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with checkpoint_reads():
        assert safe_torch_load(path)["a"].item() == 0
        os.replace(saved(tmp_path / "y.pt", {"a": torch.ones(1)}), path)
        assert safe_torch_load(path)["a"].item() == 1


def saved(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def test_reconfigure_releases_the_old_networks_before_building_the_new_ones(monkeypatch):
    method = seeded("lama_tiny", perceptual_network="none")
    old = weakref.ref(next(method.generator.parameters()))
    alive_while_building = []
    build = LaMa.__init__

    def spying(self, config):
        alive_while_building.append(old() is not None)
        build(self, config)

    monkeypatch.setattr(LaMa, "__init__", spying)
    method.reconfigure({"n_blocks": 3})
    assert alive_while_building == [False]
    assert method.config.n_blocks == 3 and method.name == "lama_tiny"


def test_reconfigure_initialises_the_new_networks_as_building_them_fresh_would(monkeypatch):
    torch.manual_seed(5)
    reconfigured = create_method("lama_tiny", perceptual_network="none")
    reconfigured.reconfigure({"n_blocks": 3})
    torch.manual_seed(5)
    create_method("lama_tiny", perceptual_network="none")
    fresh = create_method("lama_tiny", perceptual_network="none", n_blocks=3)
    for (name, mine), theirs in zip(reconfigured.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(mine, theirs), name


# ------------------------------------------------------------------ releases as users download them (item 7)
def test_edgeconnect_files_in_torch_1_0s_legacy_format_load_through_the_safe_path(tmp_path, monkeypatch, capsys):
    source = ec_folder(tmp_path / "weights" / "ec" / "celeba", legacy=True)
    assert not is_zip_checkpoint(tmp_path / "weights" / "ec" / "celeba" / "EdgeModel_gen.pth")
    counter = LoadCounter(monkeypatch)
    method = create_method("ec_tiny").load(tmp_path / "weights" / "ec" / "celeba")
    assert len(counter.loads) == 4 and not any(mmap for _, mmap in counter.loads)  # that format cannot be mapped
    images, masks = images_and_masks()
    torch.testing.assert_close(method.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    assert weights_cli.main(["check", str(tmp_path / "weights"), "--no-progress"]) == 0
    assert "ec/celeba" in capsys.readouterr().out


def test_lama_hyper_parameters_pickled_as_an_omegaconf_dictconfig_load_inertly(tmp_path, monkeypatch, capsys):
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is a test dependency: pip install -e .[test]")
    config = omegaconf.OmegaConf.create({"generator": {"kind": "ffc_resnet", "n_blocks": 2},
                                         "losses": {"l1": {"weight_known": 10, "weight_missing": 0}}})
    source = lama_folder(tmp_path / "weights" / "lama-fourier", hyper_parameters=config)
    globals_named = torch.serialization.get_unsafe_globals_in_checkpoint(
        tmp_path / "weights" / "lama-fourier" / "models" / "best.ckpt")
    assert "omegaconf.dictconfig.DictConfig" in globals_named  # the real class's pickle, not a stand-in's

    def never(*args, **kwargs):
        raise AssertionError("code of a class named by the checkpoint ran")

    for cls in (omegaconf.DictConfig, omegaconf.base.ContainerMetadata, omegaconf.base.Metadata,
                omegaconf.nodes.AnyNode):
        monkeypatch.setattr(cls, "__setstate__", never, raising=False)
        monkeypatch.setattr(cls, "__init__", never)
    method = seeded("lama_tiny", 1, perceptual_network="none").load(tmp_path / "weights" / "lama-fourier")
    images, masks = images_and_masks()
    assert torch.equal(method.inpaint(images, masks), source.inpaint(images, masks))
    payload = load_checkpoint_inertly(tmp_path / "weights" / "lama-fourier" / "models" / "best.ckpt")
    assert isinstance(payload["hyper_parameters"], InertObject)
    assert weights_cli.main(["check", str(tmp_path / "weights"), "--no-progress"]) == 0
    assert "fails" not in capsys.readouterr().out


def lama_all_models_archive(root: Path) -> Path:
    """lama-models.zip unpacked: both models are lama-fourier (9 FFC blocks), as published (generator only,
    no loss_* weights). Narrow here, so paper-size code paths run on small tensors."""
    archive = root / "lama" / "LaMa_models"
    for dataset in ("lama-places", "lama-celeba-hq"):
        lama_folder(archive / dataset / "lama-fourier", n_blocks=9, ngf=8, disc_ndf=8, discriminator=False,
                    losses=False)
    return archive


def test_the_lama_archive_gives_a_weights_block_the_paper_preset_accepts_as_printed(tmp_path, capsys):
    archive = lama_all_models_archive(tmp_path / "weights")
    assert weights_cli.main(["check", str(tmp_path / "weights"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("lama_fourier") >= 2 and "loads (generator only)" in out
    note = " ".join(line.lstrip("# ") for line in out.split("# paste into", 1)[0].splitlines() if line.startswith("#"))
    assert "make_checkpoint step drops discriminator.* and loss_*" in note and "big-lama-with-discr" in note
    block = out.split("# paste into a benchmark config", 1)[1].split("\n", 1)[1]
    places, faces = (str((archive / d / "lama-fourier").resolve()) for d in ("lama-places", "lama-celeba-hq"))
    assert yaml.safe_load(block) == {"weights": {"lama_fourier": {"celeba": faces, "paris": places,
                                                                  "places2": places}}}
    assert "# lama_fourier: paris is served by its places2 release; its authors publish no paris model" in block
    assert "# lama_fourier: celeba is served by its celeba_hq release" in block
    mine = tmp_path / "my-paper.yaml"  # the preset plus the block, pasted as printed
    mine.write_text((PRESETS / "paper.yaml").read_text() + "\n" + block)
    config = parse_config(BenchmarkConfig, ["--config", str(mine)], presets=PRESETS, default_preset="default",
                          description="")
    checked = check_weights(config, resolve_methods(config))  # what the benchmark runs before any cell
    assert {label: weights.path for (method, label), weights in checked.items()} == {
        "celeba": faces, "paris": places, "places2": places}
    assert {weights.variant for weights in checked.values()} == {"lama_fourier"}


# torch APIs the code relies on and the release that brought each: pyproject's floor must cover them all
TORCH_APIS = {"torch.serialization.safe_globals": (2, 5), "get_unsafe_globals_in_checkpoint": (2, 6),
              "fp32_precision": (2, 9)}


def test_the_torch_floor_covers_the_apis_the_code_relies_on():
    root = Path(__file__).resolve().parents[1]
    code = "\n".join(path.read_text() for folder in ("bench", "baselines") for path in (root / folder).glob("*.py"))
    assert all(api in code for api in TORCH_APIS), "an API left the code: drop it from TORCH_APIS"
    requirements = {}
    for line in (root / "pyproject.toml").read_text().splitlines():
        found = re.match(r'\s*"(torch|torchvision)>=(\d+)\.(\d+)', line)
        if found:
            requirements[found.group(1)] = (int(found.group(2)), int(found.group(3)))
    assert requirements["torch"] >= max(TORCH_APIS.values())
    # torchvision 0.N+15 is the release built for torch 2.N
    assert requirements["torchvision"] == (0, requirements["torch"][1] + 15)
