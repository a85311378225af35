import math

import pytest
import torch

from bench.errors import CheckpointError, NotTrainable, UserError, WeightsUnavailable
from baselines.ddnm import (DDNMConfig, PreDrawnNoise, alpha_bar_table, ddnm, ddnm_imagenet, ddnm_sample, ddnm_tiny,
                            gaussian_like, linear_betas, time_travel_schedule, timestep_pairs)
from baselines.ddnm_unet import GuidedAttention, SimpleUNet

# A 32² member of the family: fast enough for sampler properties on CPU.
SMALL = dict(image_size=32, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), norm_groups=8,
             steps=4, prior="none")


def small_method(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return ddnm_tiny(**{**SMALL, **overrides})


def small_unet(seed: int = 0) -> SimpleUNet:
    torch.manual_seed(seed)
    return SimpleUNet(resolution=32, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                      norm_groups=8).eval()


def inpainting_problem(seed: int = 0, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 32, 32, generator=generator)
    holes = torch.zeros(batch, 1, 32, 32)
    holes[:, :, 8:24, 6:20] = 1
    return images, holes


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the networks
def test_celeba_hq_unet_has_the_official_parameter_count_and_key_names():
    with torch.device("meta"):  # 113M parameters without allocating them
        method = ddnm(prior="none", ema_decay=0.0)
    assert method.num_parameters() == {"unet": 113_673_219}
    keys = set(method.unet.state_dict())
    for key in ["temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.0.norm1.weight",
                "down.0.block.1.temb_proj.weight", "down.2.block.0.nin_shortcut.weight", "down.4.attn.1.q.weight",
                "down.4.downsample.conv.weight", "mid.block_1.conv1.weight", "mid.attn_1.q.weight",
                "mid.attn_1.proj_out.bias", "mid.block_2.norm2.weight", "up.0.block.2.conv2.weight",
                "up.4.attn.2.v.weight", "up.5.upsample.conv.weight", "norm_out.weight", "conv_out.weight"]:
        assert key in keys, key
    # attention only at 16×16 (level 4 of 256 → 8); no downsampling after the last level, no upsampling at the first
    attention_levels = {tuple(k.split(".")[:2]) for k in keys if ".attn." in k}
    assert attention_levels == {("down", "4"), ("up", "4")}
    assert "down.5.downsample.conv.weight" not in keys and "up.0.upsample.conv.weight" not in keys


def test_imagenet_unet_has_the_official_parameter_count_and_key_names():
    with torch.device("meta"):
        method = ddnm_imagenet(prior="none", ema_decay=0.0)
    assert method.num_parameters() == {"unet": 552_814_086}
    state = method.unet.state_dict()
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight",
                "input_blocks.3.0.in_layers.2.weight", "middle_block.0.emb_layers.1.weight",
                "middle_block.1.norm.weight", "middle_block.1.proj_out.bias",
                "output_blocks.0.0.skip_connection.weight", "out.0.weight", "out.2.weight"]:
        assert key in state, key
    # middle width 4·256; a 1×1 Conv1d makes q, k and v; scale-shift doubles the embedding projection
    assert tuple(state["middle_block.1.qkv.weight"].shape) == (3 * 1024, 1024, 1)
    assert tuple(state["middle_block.0.emb_layers.1.weight"].shape) == (2 * 1024, 1024)
    assert tuple(state["out.2.weight"].shape) == (6, 256, 3, 3)  # ε and the learned variance


def test_guided_attention_uses_the_legacy_head_major_qkv_layout():
    torch.manual_seed(0)
    attention = GuidedAttention(channels=32, head_channels=8).eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, 32, 16)
        qkv = attention.qkv(attention.norm(flat)).reshape(2 * 4, 3 * 8, 16)  # heads first, then q, k, v
        q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(8), dim=-1)
        expected = flat + attention.proj_out(torch.einsum("bts,bcs->bct", weights, v).reshape(2, 32, 16))
        torch.testing.assert_close(attention(x), expected.reshape(2, 32, 4, 4), atol=1e-5, rtol=1e-5)


def test_guided_network_round_trips_and_exposes_only_eps(tmp_path):
    guided = dict(SMALL, network="guided", ch=32, head_channels=16, ema_decay=0.0)
    source = small_method(seed=0, **guided)
    torch.save(source.unet.state_dict(), tmp_path / "256x256_diffusion_uncond.pt")
    target = small_method(seed=1, **guided)
    target.load(tmp_path / "256x256_diffusion_uncond.pt")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([20.0, 700.0])
    with torch.no_grad():
        assert source.unet(x, t).shape[1] == 6
        one_by_one = torch.cat([source.unet(x[i:i + 1], t[i:i + 1]) for i in range(2)])  # as eps runs on the CPU
        assert torch.equal(target.eps(x, t), one_by_one[:, :3])
    images, holes = inpainting_problem()
    result = target.inpaint(images, holes)
    assert torch.equal(result * (1 - holes), images * (1 - holes))


def test_timestep_embedding_takes_fractional_times_and_the_network_keeps_the_shape():
    unet = small_unet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_early, out_late = unet(x, torch.tensor([10.0, 10.0])), unet(x, torch.tensor([900.0, 900.0]))
    assert out_early.shape == x.shape
    assert not torch.allclose(out_early, out_late)  # the timestep reaches the output


def forward_batch_sizes(network: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = network.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    return sizes, handle


def test_on_the_cpu_each_pair_gets_the_bits_it_gets_alone_in_any_batch():
    """The U-Net runs one sample at a time on the CPU: batched, matrix products of fewer than four rows and
    batch-1 convolutions take other kernels, and a pair's result would move by round-off with its batch."""
    method = small_method(seed=3)
    images, holes = inpainting_problem(seed=4, batch=5)
    together = method.inpaint(images, holes)
    alone = torch.cat([method.inpaint(images[i:i + 1], holes[i:i + 1]) for i in range(5)])
    in_two = torch.cat([method.inpaint(images[:2], holes[:2]), method.inpaint(images[2:], holes[2:])])
    assert torch.equal(together, alone) and torch.equal(together, in_two)
    sizes, handle = forward_batch_sizes(method.sampling_network())
    method.inpaint(images, holes)
    handle.remove()
    assert sizes == [1] * 5 * SMALL["steps"]


def test_where_metric_networks_take_batches_the_network_sees_the_whole_batch(monkeypatch):
    """A GPU stand-in: where :func:`bench.devices.network_chunk` gives more than one image per call, ε comes from
    one call over the batch, with the values of that call."""
    import baselines.ddnm

    monkeypatch.setattr(baselines.ddnm, "network_chunk", lambda device: 64)
    method = small_method(seed=3)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([10.0, 10.0, 10.0])
    sizes, handle = forward_batch_sizes(method.sampling_network())
    with torch.no_grad():
        eps = method.eps(x, t)
        expected = method.sampling_network()(x, t)[:, :3]
    handle.remove()
    assert sizes == [3, 3] and torch.equal(eps, expected)


# ----------------------------------------------------------------------------- official checkpoints
def test_official_layouts_round_trip_strictly(tmp_path):
    source = small_method(seed=0, ema_decay=0.0)
    state = source.unet.state_dict()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([400.0, 30.0])
    with torch.no_grad():
        expected = source.eps(x, t)

    bare = tmp_path / "celeba_hq.ckpt"  # SDEdit: a bare state_dict
    torch.save(state, bare)
    ema_state = {f"module.{k}": v + 1 for k, v in state.items()}
    ddim_list = tmp_path / "ckpt.pth"  # ermongroup/ddim: [model, optimizer, epoch, step, ema], DataParallel names
    torch.save([{f"module.{k}": v for k, v in state.items()}, {"state": {}, "param_groups": []}, 3, 10, ema_state],
               ddim_list)

    target = small_method(seed=1)
    with torch.no_grad():
        assert not torch.allclose(target.eps(x, t), expected)
    target.load(bare)
    assert not target.trainable
    with torch.no_grad():
        assert torch.equal(target.eps(x, t), expected)  # the EMA twin received the weights too
    assert torch.equal(target.unet.state_dict()["conv_out.weight"], state["conv_out.weight"])
    with pytest.raises(NotTrainable):
        target.train_step({"image": torch.rand(2, 3, 32, 32), "mask": torch.zeros(2, 1, 32, 32)})

    from_list = small_method(seed=2)
    from_list.load(ddim_list)  # the EMA entry is the one DDIM samples with
    assert torch.equal(from_list.unet.state_dict()["conv_in.bias"], state["conv_in.bias"] + 1)

    broken = dict(state)
    broken.pop("mid.attn_1.k.weight")
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="mid.attn_1.k.weight"):
        small_method().load(tmp_path / "broken.ckpt")


def test_harness_checkpoint_round_trip_gives_identical_inpainting(tmp_path):
    source = small_method(seed=0)
    images, holes = inpainting_problem()
    source.train_step({"image": images, "mask": holes})  # EMA and weights now differ from the initialisation
    source.save(tmp_path / "model.pt")
    target = small_method(seed=5)
    target.load(tmp_path / "model.pt")
    assert torch.equal(source.inpaint(images, holes), target.inpaint(images, holes))


def test_official_prior_is_required_when_asked_for_and_substituted_otherwise():
    with pytest.raises(WeightsUnavailable):
        ddnm_tiny(**{**SMALL, "prior": "official"})
    method = ddnm_tiny(**{**SMALL, "prior": "auto"})
    assert method.trainable and "trained by the harness" in method.substitutions["prior"]


# ----------------------------------------------------------------------------- schedule
def test_time_travel_schedule_follows_the_repaint_rule():
    # derived by hand: jump points 0 and 2 (every 2nd index below 6 - 2), each jumped back once
    assert time_travel_schedule(6, 2, 2) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    for length in (1, 3, 7):
        assert time_travel_schedule(10, length, 1) == list(range(9, -2, -1))
    # official spacing: skip = 1000 // steps, and the walk ends at t = -1 (ᾱ = 1)
    assert timestep_pairs(4, 1, 1) == [(750, 500), (500, 250), (250, 0), (0, -1)]
    with pytest.raises(UserError):
        time_travel_schedule(10, 0, 1)


def test_alpha_bar_table_starts_at_one_and_matches_the_linear_schedule():
    betas = linear_betas()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    table = alpha_bar_table(betas)
    assert table[0] == 1.0
    assert table[1] == pytest.approx(1 - 1e-4) and table[3] == pytest.approx(math.prod(1 - betas[:3]))


# ----------------------------------------------------------------------------- sampler properties
@pytest.mark.parametrize("solver", ["svd", "simplified"])
def test_known_pixels_of_the_result_equal_the_input_exactly_without_measurement_noise(solver):
    unet = small_unet()
    images, holes = inpainting_problem()
    y, known = images * 2 - 1, 1 - holes
    x0 = ddnm_sample(unet, y, known, steps=5, eta=0.85, sigma_y=0.0, solver=solver, generator=seeded(0))
    known_everywhere = known.expand_as(y).bool()
    assert torch.equal(x0[known_everywhere], y[known_everywhere])
    assert not torch.allclose(x0[~known_everywhere], y[~known_everywhere])  # holes are generated, not copied


def test_clipping_keeps_the_prediction_in_range():
    unet = small_unet()
    images, holes = inpainting_problem()
    y, known = images * 2 - 1, 1 - holes
    clipped = ddnm_sample(unet, y, known, steps=4, clip_x0=True, generator=seeded(0))
    free = ddnm_sample(unet, y, known, steps=4, clip_x0=False, generator=seeded(0))
    assert clipped.abs().max() <= 1.0
    assert free.abs().max() > 1.0  # an untrained ε-network overshoots without the clamp


def test_ddnm_plus_relaxes_the_known_pixels_at_the_last_step():
    unet = small_unet()
    images, holes = inpainting_problem()
    y, known = images * 2 - 1, (1 - holes).expand(-1, 3, -1, -1).bool()
    x0 = ddnm_sample(unet, y, 1 - holes, steps=5, sigma_y=0.1, generator=seeded(0))
    assert not torch.equal(x0[known], y[known])  # at σ_t = 0 < a·σ_y the official λ is 0


def test_fixed_initial_noise_and_eta_zero_are_bit_identical():
    unet = small_unet()
    images, holes = inpainting_problem()
    y, known = images * 2 - 1, 1 - holes
    x_T = torch.randn(y.shape, generator=seeded(3))
    runs = []
    for global_seed in (1, 2):  # a different global RNG state must not matter
        torch.manual_seed(global_seed)
        runs.append(ddnm_sample(unet, y, known, steps=5, eta=0.0, initial_noise=x_T))
    assert torch.equal(runs[0], runs[1])
    noisy = []
    for global_seed in (1, 2):  # with η > 0 fresh noise enters, so the check above can fail
        torch.manual_seed(global_seed)
        noisy.append(ddnm_sample(unet, y, known, steps=5, eta=0.85, initial_noise=x_T))
    assert not torch.equal(noisy[0], noisy[1])


def reference_ddnm(eps_fn, y, known, steps, eta, generator):
    """Plain DDNM without time travel, written out from the paper (Algorithm 1 with a DDIM update)."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    skip = 1000 // steps
    x = torch.randn(y.shape, generator=generator)
    for index in range(steps - 1, -1, -1):
        t = index * skip
        a_t = alpha_bar[t].item()
        a_next = alpha_bar[t - skip].item() if index > 0 else 1.0
        eps = eps_fn(x, torch.full((y.shape[0],), float(t)))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x0 = known * y + (1 - known) * x0
        z = torch.randn(y.shape, generator=generator)
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * (eta * z + (1 - eta ** 2) ** 0.5 * eps)
    return x


def test_time_travel_with_length_one_and_one_repeat_equals_no_time_travel():
    unet = small_unet()
    images, holes = inpainting_problem(batch=1)
    y, known = images * 2 - 1, 1 - holes
    with torch.no_grad():
        expected = reference_ddnm(unet, y, known, steps=6, eta=0.85, generator=seeded(7))
    plain = ddnm_sample(unet, y, known, steps=6, eta=0.85, travel_length=1, travel_repeat=1, generator=seeded(7))
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    longer = ddnm_sample(unet, y, known, steps=6, eta=0.85, travel_length=3, travel_repeat=1, generator=seeded(7))
    assert torch.equal(plain, longer)  # one repeat never jumps, whatever the length
    travelled = ddnm_sample(unet, y, known, steps=6, eta=0.85, travel_length=2, travel_repeat=2,
                            generator=seeded(7))
    assert not torch.allclose(plain, travelled)


def test_per_sample_generators_make_each_sample_independent_of_the_batch():
    unet = small_unet()
    images, holes = inpainting_problem(batch=2)
    y, known = images * 2 - 1, 1 - holes
    both = ddnm_sample(unet, y, known, steps=3, generator=[seeded(10), seeded(11)])
    second = ddnm_sample(unet, y[1:], known[1:], steps=3, generator=[seeded(11)])
    torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=1e-4)  # batched-conv roundoff only


# ----------------------------------------------------------------------------- noise drawn ahead of the steps
@pytest.mark.parametrize("per_sample", [False, True])
def test_pre_drawn_noise_equals_one_draw_per_step_across_chunks(per_sample):
    """Draws made several steps at a time (here chunks of 2 of 5 draws, so a partial last chunk) are the ones a
    :func:`gaussian_like` call per step gives, generator by generator."""
    like = torch.zeros(3, 3, 8, 8)
    def generators():
        return [seeded(20 + i) for i in range(3)] if per_sample else seeded(20)
    chunk_bytes = 2 * like.numel() * 4
    pre_drawn, stepwise = PreDrawnNoise(generators(), like, draws=5, chunk_bytes=chunk_bytes), generators()
    for _ in range(5):
        assert torch.equal(pre_drawn(), gaussian_like(like, stepwise))
    with pytest.raises(RuntimeError, match="more noise"):
        pre_drawn()


def test_sampling_with_cpu_generators_draws_what_the_global_rng_would_per_step():
    """The sampler's noise from a CPU generator is pre-drawn; from the global RNG (the same seed, the same
    sequence) it is drawn step by step. Equal results show the same numbers reach the same steps, time
    travel included."""
    images, holes = inpainting_problem(batch=2)
    y, known = images * 2 - 1, 1 - holes
    def eps(x, t):  # elementwise: no batch-dependent roundoff
        return 0.1 * x + 1e-4 * t.view(-1, 1, 1, 1)
    options = dict(steps=6, eta=0.85, travel_length=2, travel_repeat=1)
    torch.manual_seed(31)
    stepwise = ddnm_sample(eps, y, known, **options)
    assert torch.equal(ddnm_sample(eps, y, known, generator=seeded(31), **options), stepwise)
    per_pair = [ddnm_sample(eps, y[i:i + 1], known[i:i + 1], generator=seeded(40 + i), **options) for i in range(2)]
    batched = ddnm_sample(eps, y, known, generator=[seeded(40), seeded(41)], **options)
    assert torch.equal(batched, torch.cat(per_pair))
    for i in range(2):
        torch.manual_seed(40 + i)
        assert torch.equal(per_pair[i], ddnm_sample(eps, y[i:i + 1], known[i:i + 1], **options))


def test_training_reads_the_alpha_bar_table_of_the_schedule():
    method = small_method()
    x = torch.zeros(2, 3, 32, 32)
    table = method.training_alpha_bars(x)
    assert table is method.training_alpha_bars(x)  # made once per device and dtype, not per step
    assert torch.equal(table, torch.as_tensor(alpha_bar_table(method.betas)[1:], dtype=torch.float32))


# ----------------------------------------------------------------------------- the method
def test_inpaint_is_reproducible_keeps_known_pixels_and_ignores_batch_composition():
    method = small_method()
    images, holes = inpainting_problem(batch=3)
    first, again = method.inpaint(images, holes), method.inpaint(images, holes)
    assert torch.equal(first, again)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first * (1 - holes), images * (1 - holes))
    alone = method.inpaint(images[2:], holes[2:])
    torch.testing.assert_close(alone, first[2:], atol=1e-4, rtol=1e-4)
    other_seed = ddnm_tiny(**{**SMALL, "seed": 99})
    other_seed.load_state_dict(method.state_dict())
    assert not torch.allclose(other_seed.inpaint(images, holes), first)


def test_inpaint_rejects_images_of_another_size():
    method = small_method()
    with pytest.raises(UserError, match="32×32"):
        method.inpaint(torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16))


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="solver"):
        ddnm_tiny(**{**SMALL, "solver": "exact"})
    with pytest.raises(UserError, match="norm_groups"):
        ddnm_tiny(**{**SMALL, "ch": 12})
    with pytest.raises(UserError, match="travel"):
        ddnm_tiny(**{**SMALL, "travel_repeat": 0})


def test_training_is_seeded_ignores_masks_and_lowers_the_noise_prediction_error():
    images, holes = inpainting_problem(batch=4)

    def probe_error(method) -> float:  # fixed timesteps and noise, so only the weights change it
        t = torch.tensor([100, 300, 500, 800])
        noise = torch.randn(images.shape, generator=seeded(123))
        a = torch.as_tensor(alpha_bar_table(method.betas)[t + 1], dtype=torch.float32).view(-1, 1, 1, 1)
        with torch.no_grad():
            predicted = method.unet(a.sqrt() * (images * 2 - 1) + (1 - a).sqrt() * noise, t.float())
        return float((predicted - noise).square().mean())

    def trained(masks, steps):
        method = small_method(seed=0)
        torch.manual_seed(42)  # the harness seeds the global RNG before training
        losses = [method.train_step({"image": images, "mask": masks}) for _ in range(steps)]
        return method, losses

    with_holes, losses = trained(holes, 2)
    inverted, inverted_losses = trained(1 - holes, 2)
    assert losses == inverted_losses  # identical although the masks differ
    assert torch.equal(with_holes.unet.conv_out.weight, inverted.unet.conv_out.weight)
    assert set(losses[0]) == {"eps_loss", "eps_mse"}

    before = probe_error(small_method(seed=0))
    method, _ = trained(holes, 8)
    assert probe_error(method) < 0.85 * before


def test_paper_config_defaults_are_the_official_ones():
    config = DDNMConfig()
    network = (config.network, config.image_size, config.ch, tuple(config.ch_mult), config.num_res_blocks)
    assert network == ("simple", 256, 128, (1, 1, 2, 2, 4, 4), 2)  # configs/celeba_hq.yml
    sampler = (config.steps, config.eta, config.sigma_y, config.travel_length, config.travel_repeat, config.clip_x0)
    assert sampler == (100, 0.85, 0.0, 1, 1, False)  # T_sampling, --eta, --sigma_y, time_travel; no clipping
    betas = linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
    assert (len(betas), betas[0], betas[-1]) == (1000, 1e-4, 0.02)
