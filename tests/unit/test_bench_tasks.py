"""The benchmark's second task (bench/digits/shapes.py, tasks.py): data, caption conditioning, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.digits import shapes
from bench.digits.grid import image_grid, labelled_rows
from bench.digits.metrics import Judge, JudgeConfig, blur, laplacian_energy
from bench.digits.model import EpsDenoiser, make_schedule
from bench.digits.tasks import TASKS, make_net


def test_shapes_splits_are_deterministic_paired_and_in_range():
    a, b = shapes.load_splits("striped"), shapes.load_splits("striped")
    assert torch.equal(a.base_train_x, b.base_train_x) and torch.equal(a.target_test_x, b.target_test_x)
    n = len(shapes.CAPTIONS) * shapes.PER_CAPTION
    assert a.base_train_x.shape[0] + a.base_test_x.shape[0] == n
    assert a.base_train_x.shape[1:] == shapes.IMAGE_SHAPE
    # 80/20 per caption, every caption on both sides
    assert torch.bincount(a.base_test_y, minlength=len(shapes.CAPTIONS)).tolist() == [40] * 24
    for x in (a.base_train_x, a.target_train_x):
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # base and target are the same drawings: same shape mask, and the style only darkens pixels
    inside_base = (a.base_train_x > -1).any(dim=1)
    inside_target = (a.target_train_x > -1).any(dim=1)
    assert torch.equal(inside_base, inside_target)
    assert bool((a.target_train_x <= a.base_train_x + 1e-6).all())


def test_stripes_are_a_texture_blur_removes():
    s = shapes.load_splits("striped")
    target, base = s.target_test_x[:200], s.base_test_x[:200]
    # the stripes add high-frequency energy; one blur takes most of it away again
    assert float(laplacian_energy(target).mean()) > 1.5 * float(laplacian_energy(base).mean())
    assert float(laplacian_energy(blur(target)).mean()) < 0.6 * float(laplacian_energy(target).mean())


def test_fixed_stripes_share_one_phase_and_the_drawings():
    rand, fixed = shapes.load_splits("striped"), shapes.load_splits("striped_fixed")
    assert torch.equal(rand.base_train_x, fixed.base_train_x)  # same drawings, only the fill differs
    lum = fixed.target_train_x[:400].mean(dim=1)  # (N, H, W)
    inside = (fixed.base_train_x[:400] > -1).any(dim=1)
    ii, jj = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    on = (((ii + jj) // 2) % 2 == 0).expand_as(lum)
    # every image's bright fill lies on the same phase-0 stripes, the dim fill between them
    base_lum = fixed.base_train_x[:400].mean(dim=1)
    bright = inside & (lum > base_lum - 1e-6)
    assert torch.equal(bright, inside & on)
    # the random-phase targets do not all share it
    rand_bright = inside & (rand.target_train_x[:400].mean(dim=1) > base_lum - 1e-6)
    assert not torch.equal(rand_bright, inside & on)
    assert float(shapes.stripe_score(fixed.target_test_x[:200]).mean()) > 0.6


def test_unknown_style_and_shape_are_refused():
    with pytest.raises(ValueError, match="unknown target style 'wavy'"):
        shapes.load_splits("wavy")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        shapes.render([("star", "red", 8.0, 8.0, 5.0, 1.0, 0)], None)


def test_caption_conditioning_reads_words():
    task = TASKS["shapes"]
    tokens = shapes.caption_tokens()
    assert tokens.shape == (task.num_classes + 1, 2) and tokens[-1].tolist() == [0, 0]
    torch.manual_seed(0)
    net = make_net(task)
    red_circle, red_square = shapes.CAPTIONS.index("red circle"), shapes.CAPTIONS.index("red square")
    emb = net.cond_embedding(torch.tensor([red_circle, red_square, task.num_classes]))
    red = net.word_emb.weight[shapes.VOCAB.index("red") + 1]
    circle = net.word_emb.weight[shapes.VOCAB.index("circle") + 1]
    torch.testing.assert_close(emb[0], red + circle)
    torch.testing.assert_close(emb[2], net.empty_emb)  # the empty caption (CFG's unconditional)
    # the words are shared: a gradient through "red circle" reaches the "red" row that "red square" uses
    net.cond_embedding(torch.tensor([red_circle])).sum().backward()
    assert float(net.word_emb.weight.grad[shapes.VOCAB.index("red") + 1].abs().sum()) > 0
    assert float(net.word_emb.weight.grad[shapes.VOCAB.index("square") + 1].abs().sum()) == 0


def test_guided_denoiser_uses_the_empty_caption_and_keeps_the_image_shape():
    task = TASKS["shapes"]
    torch.manual_seed(0)
    net = make_net(task)
    torch.nn.init.normal_(net.out.weight, std=0.01)  # the zero-initialised output would hide cond
    ms = make_schedule()
    x = torch.randn(4, *task.image_shape)
    sigma = torch.full((4,), 2.0)
    cond = torch.tensor([0, 5, 10, 23])
    out = EpsDenoiser(net, ms, guidance=2.0)(x, sigma, cond)
    assert out.shape == x.shape
    eps_c = net(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), cond)
    eps_u = net(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), torch.full_like(cond, 24))
    torch.testing.assert_close(out, x - sigma.view(-1, 1, 1, 1) * (eps_u + 2.0 * (eps_c - eps_u)))


def test_judge_sizes_follow_the_task():
    task = TASKS["shapes"]
    judge = Judge(JudgeConfig(hidden=32, features=8), task.image_shape, task.num_classes)
    assert judge(torch.zeros(2, *task.image_shape)).shape == (2, 48)
    assert judge.features(torch.zeros(2, *task.image_shape)).shape == (2, 8)


def test_rgb_grid_keeps_colour_and_grey_grid_is_unchanged():
    rgb = torch.full((2, 3, 4, 4), -1.0)
    rgb[0, 0] = 1.0  # pure red
    g = image_grid(rgb, nrow=2, scale=2, pad=1)
    assert g.shape == (1 * (8 + 1) + 1, 2 * (8 + 1) + 1, 3)
    assert g[1, 1].tolist() == [255, 0, 0] and g[1, 10].tolist() == [0, 0, 0]
    grey = image_grid(torch.full((1, 1, 2, 2), 1.0), nrow=1, scale=1, pad=0)
    assert grey.shape == (2, 2) and int(grey.max()) == 0  # full ink is drawn black on white
    page = labelled_rows([("rgb", g), ("grey", np.full((5, 5), 255, dtype=np.uint8))])
    assert page.ndim == 3 and page.shape[2] == 3


def test_noise_skip_carries_the_input_with_a_per_timestep_gate():
    task = TASKS["shapes"]
    assert task.noise_skip and not TASKS["digits"].noise_skip
    torch.manual_seed(0)
    net = make_net(task)
    x, t, y = torch.randn(3, *task.image_shape), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(net(x, t, y), torch.zeros_like(x))  # zero-initialised out and gate
    torch.nn.init.constant_(net.skip_gate.bias, 0.5)
    torch.testing.assert_close(net(x, t, y), 0.5 * x)
    # a 768-value image through a 384-wide MLP: only the gate can carry the noise
    assert net.config.width < x[0].numel()


def test_stripe_score_tells_stripes_from_noise_and_flat_fills():
    s = shapes.load_splits("striped")
    target, base = s.target_test_x[:300], s.base_test_x[:300]
    noisy = base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    assert float(shapes.stripe_score(target).mean()) > 0.6
    assert float(shapes.stripe_score(base).mean()) < 0.01
    assert float(shapes.stripe_score(noisy).mean()) < 0.15  # texture the judge may like, but not stripes
    assert float(shapes.stripe_score(blur(target)).mean()) < float(shapes.stripe_score(target).mean())


def _tiny_shapes_student():
    from bench.digits.model import ModelConfig

    task = TASKS["shapes"]
    torch.manual_seed(0)
    net = make_net(task, ModelConfig(width=32, depth=1, emb_dim=16))
    for p in net.parameters():  # a non-trivial start (the zero-initialised output would sample zeros)
        torch.nn.init.normal_(p, std=0.05)
    return task, net.eval().requires_grad_(False)


def test_online_rows_need_the_tasks_reward_and_pair_best_with_worst():
    from bench.digits.finetune import FinetuneConfig, finetune

    task, student = _tiny_shapes_student()
    splits = shapes.load_splits("striped_fixed")
    ms = make_schedule()
    cfg = FinetuneConfig(steps=2, batch=8, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="needs the task's reward"):
        finetune(student, ms, splits, "pso_online", cfg)
    seen: list[torch.Tensor] = []

    def reward(images: torch.Tensor) -> torch.Tensor:
        scores = shapes.stripe_score(images)
        seen.append(scores)
        return scores

    run = finetune(student, ms, splits, "pso_online_k2", cfg, reward=reward)
    # two rounds (one per step), every class a prompt, K = 2 samples each, scored on final images
    assert len(seen) == 2 * task.num_classes and all(s.shape == (2,) for s in seen)
    assert len(run.result.loss_history) == 2
    # Eq. 7 starts at log 2 (target and reference log-ratios both 0) and the adapter moved
    assert run.result.loss_history[0] == pytest.approx(float(np.log(2.0)), abs=1e-5)
    assert any(float(p.abs().sum()) > 0 for p in run.lora.up.values())
    assert "implicit_accuracy" in run.result.metrics_history[-1]


def test_ema_rows_end_with_the_trainers_average_of_the_same_run():
    """An ``*_ema`` row trains exactly as its plain row (same losses) and ends with pso.trainer's
    moving average (TrainConfig.ema_decay, the product's code), which differs from the last weights."""
    from bench.digits.finetune import METHODS, FinetuneConfig, finetune

    _, student = _tiny_shapes_student()
    splits = shapes.load_splits("striped_fixed")
    ms = make_schedule()
    cfg = FinetuneConfig(steps=3, batch=8, lr=1e-3, seed=0)
    plain, averaged = finetune(student, ms, splits, "sft", cfg), finetune(student, ms, splits, "sft_ema", cfg)
    assert METHODS["sft_ema"].ema == 0.99 and averaged.result.averaged and not plain.result.averaged
    assert averaged.result.loss_history == plain.result.loss_history
    a, b = plain.lora.state_dict(), averaged.lora.state_dict()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_long_row_labels_wrap_after_underscores():
    from bench.digits.grid import wrap_name

    assert wrap_name("pso_offline_fresh_mix_sft_ema_final", 24) == ["pso_offline_fresh_mix_", "sft_ema_final"]
    assert wrap_name("sft", 24) == ["sft"]
    assert wrap_name("x" * 30, 24) == ["x" * 24, "x" * 6]


def test_brightness_reward_orders_shapes_by_their_fill_and_the_task_names_its_rewards():
    img = -torch.ones(3, 3, 16, 16)
    img[0, :, 4:12, 4:12] = 1.0  # a white square
    img[1, :, 4:12, 4:12] = 0.0  # the same square at half brightness
    scores = shapes.brightness_score(img)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.5) and scores[2] == 0.0
    task = TASKS["shapes"]
    assert task.reward() is shapes.stripe_score and task.reward("brightness") is shapes.brightness_score
    assert TASKS["digits"].reward() is None
    with pytest.raises(ValueError, match="has no reward 'size'"):
        task.reward("size")


def test_centre_reward_scores_the_shapes_offset_not_its_brightness():
    img = -torch.ones(5, 3, 16, 16)
    img[0, :, 4:12, 4:12] = 1.0  # a square centred on the image
    img[1, :, 4:12, 4:12] = -0.5  # the same square, dim (still above the ink threshold)
    img[2, :, 6:14, 4:12] = 1.0  # moved 2 px down
    img[3, :, 0:4, 0:4] = 1.0  # in the corner: 6 px away on each axis, past the scale
    scores = shapes.centre_score(img)  # img[4] has no shape pixel
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(1.0)
    assert scores[2] == pytest.approx(0.5) and scores[3] == 0.0 and scores[4] == 0.0
    # the data itself: centres jittered by up to 2 px per axis, every drawing scores above 0
    real = shapes.centre_score(shapes.load_splits("striped_fixed").base_train_x)
    assert 0.5 < float(real.mean()) < 0.7 and float(real.min()) > 0.0
    assert TASKS["shapes"].reward("centre") is shapes.centre_score


def test_the_lr_picked_for_an_online_row_is_named_for_what_it_is():
    """best_lrs ranks by FD to the target images; an online row never sees them, so its pick is the lr
    of least drift, and the report and the sample grid say so instead of 'best'."""
    from bench.digits.run import lr_choice

    assert lr_choice("sft") == "best" and lr_choice("pso_offline_fresh_mix_sft_ema_final") == "best"
    assert {lr_choice(m) for m in ("pso_online", "pso_online_clipped_k2", "raft")} == {"least drift"}


def test_raft_row_trains_on_the_best_of_k_samples_of_the_same_rounds(monkeypatch):
    """The online baseline: best-of-K fine-tuning draws the rounds online PSO draws and trains the plain
    loss on each pair's best sample: the batches it sees are those samples (the reward's top scores)."""
    from bench.digits import finetune as ft

    task, student = _tiny_shapes_student()
    splits = shapes.load_splits("striped_fixed")
    cfg = ft.FinetuneConfig(steps=2, batch=8, lr=1e-3, seed=0)
    best: list[torch.Tensor] = []

    def reward(images: torch.Tensor) -> torch.Tensor:
        scores = shapes.brightness_score(images)
        best.append(images[scores.argmax()].clamp(-1, 1))
        return scores

    seen: list[torch.Tensor] = []
    step_fn = ft.make_step_fn

    def recording(method, *args, **kw):
        inner = step_fn(method, *args, **kw)

        def fn(batch, generator):
            seen.append(batch.target.clone())
            return inner(batch, generator)
        return fn

    monkeypatch.setattr(ft, "make_step_fn", recording)
    run = ft.finetune(student, make_schedule(), splits, "raft", cfg, reward=reward)
    assert len(run.result.loss_history) == 2 and ft.METHODS["raft"].method.loss == "sft"
    assert len(seen) == 2 and seen[0].shape[0] == 8
    tops = torch.stack(best[: task.num_classes])  # round 0: each class's best sample
    assert all(any(torch.allclose(row, top) for top in tops) for row in seen[0])
