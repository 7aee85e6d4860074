"""The shipped demo models: loaded by their node through ComfyUI's classes, they draw legible digits /
the prompted shape and colour with the stock nodes' code paths, take a PSO LoRA through the stock
LoraLoader, and the demo runs the shipped example workflow with only the loader swapped."""

from __future__ import annotations

import copy
import importlib
import json
import logging

import numpy as np
import pytest
import torch

from tests.extension_loader import REPO_ROOT, load_package
from tests.tiny_training import train_lora


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()

    class Ext:
        demo = importlib.import_module("comfyui-pso.nodes.demo_model")
        demo_nodes = importlib.import_module("comfyui-pso.nodes.demo_nodes")
        lora_nodes = importlib.import_module("comfyui-pso.nodes.lora_nodes")
        host = importlib.import_module("comfyui-pso.nodes.host_training")
        lora = importlib.import_module("comfyui-pso.pso.lora")

    return Ext


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def bundle(ext):
    class Bundle:
        pass

    b = Bundle()
    with torch.inference_mode():  # as the host runs the loader node
        b.model, b.clip, b.vae = ext.demo_nodes.PSODemoModelLoader.execute().result
    return b


@pytest.fixture(scope="module")
def shapes_bundle(ext):
    class Bundle:
        pass

    b = Bundle()
    with torch.inference_mode():
        b.model, b.clip, b.vae = ext.demo_nodes.PSODemoModelLoader.execute("shapes").result
    return b


def _shape_captions():
    from tools.train_demo_model import captions

    return captions("shapes")


def _sample_digits(bundle, prompt, per_digit=6, seed=0, classes=10):
    """4-step lcm samples on DMD2's timesteps with CFG 1, as the demo's graphs sample, decoded.

    Returns (classes * per_digit, 32, 32, 3) images in [0, 1] and their class labels; ``prompt(c)`` is
    class c's caption."""
    import comfy.sample
    import comfy.samplers

    from pso.schedules import few_step_sigmas

    sigmas = few_step_sigmas(bundle.model.get_model_object("model_sampling"), "dmd2")
    images, labels = [], []
    with torch.inference_mode():
        for d in range(classes):
            cond = bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(prompt(d)))
            latent = torch.zeros(per_digit, 4, 4, 4)
            noise = comfy.sample.prepare_noise(latent, seed + d)
            out = comfy.sample.sample_custom(bundle.model, noise, 1.0, comfy.samplers.sampler_object("lcm"),
                                             sigmas, cond, cond, latent, seed=seed + d, disable_pbar=True)
            images.append(bundle.vae.decode(out))
            labels += [d] * per_digit
    return torch.cat(images).float(), np.array(labels)


def _digit_classifier():
    """Logistic regression on real digits passed through the demo's 32 px rendering (8x8 features)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from tools.train_demo_model import render

    digits = load_digits()
    x8 = torch.from_numpy(digits.images.astype(np.float32) / 8 - 1).unsqueeze(1)
    feats = torch.nn.functional.avg_pool2d(render(x8)[:, :1], 4).flatten(1).numpy()
    return LogisticRegression(max_iter=2000).fit(feats, digits.target)


def _features(images):
    return torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2)[:, :1], 4).flatten(1).numpy()


def _shape_classifier():
    """Logistic regression on real plain shapes (16x16 RGB, the drawings the 32 px images are made of):
    24 classes, shape x colour."""
    from sklearn.linear_model import LogisticRegression

    from bench.digits import shapes

    splits = shapes.load_splits("striped_fixed", seed=0)
    return LogisticRegression(max_iter=3000).fit(splits.base_train_x.flatten(1).numpy(), splits.base_train_y)


def _shape_features(images):
    """Decoded (N, 32, 32, 3) in [0, 1] -> the 16x16 RGB drawings in [-1, 1], flattened."""
    return (torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), 2) * 2 - 1).flatten(1).numpy()


def test_demo_loader_builds_the_hosts_sd15_classes_from_the_shipped_file(ext, bundle):
    import comfy.model_base
    import comfy.sd
    import comfy.taesd.taesd

    assert ext.demo.WEIGHTS_PATH.is_file()
    assert ext.demo.WEIGHTS_PATH.stat().st_size < 12_000_000
    assert isinstance(bundle.model.model, comfy.model_base.BaseModel)
    assert type(bundle.model.model.model_config).__name__ == "SD15"
    assert isinstance(bundle.vae, comfy.sd.VAE)
    assert isinstance(bundle.vae.first_stage_model, comfy.taesd.taesd.TAESD)
    params = sum(p.numel() for p in bundle.model.model.diffusion_model.parameters())
    assert 0.5e6 < params < 2e6, params


def test_demo_model_draws_the_digit_it_is_asked_for(ext, bundle):
    """A classifier trained on real digits reads the prompted digit in the 4-step samples. Random
    weights through the same graph (a fact checked below) read at chance level."""
    accuracy, rand_acc = _read_rates(ext, bundle, ext.demo.prompt, 10, _digit_classifier(), _features,
                                     per_class=6, rand_per_class=2)
    assert accuracy >= 0.7, accuracy
    assert rand_acc < 0.4, rand_acc


def _read_rates(ext, bundle, prompt, classes, clf, features, per_class, rand_per_class):
    """How often ``clf`` reads the prompted class in the bundle's 4-step samples, and in the samples of
    random UNet weights through the same graph (the same text encoder and VAE)."""
    images, labels = _sample_digits(bundle, prompt, per_digit=per_class, classes=classes)
    assert images.shape == (classes * per_class, 32, 32, 3)
    accuracy = float((clf.predict(features(images)) == labels).mean())

    class Random:
        model = ext.demo.build_model(seed=5)
        clip, vae = bundle.clip, bundle.vae

    with torch.inference_mode(False):
        rand_images, rand_labels = _sample_digits(Random, prompt, per_digit=rand_per_class, classes=classes)
    return accuracy, float((clf.predict(features(rand_images)) == rand_labels).mean())


def test_shapes_model_draws_the_shape_and_colour_it_is_asked_for(ext, shapes_bundle):
    """A classifier trained on real plain shapes reads the prompted caption (one of 24) in the 4-step
    samples of the shapes model; random weights through the same graph read near chance (1/24)."""
    prompt = _shape_captions().__getitem__
    accuracy, rand_acc = _read_rates(ext, shapes_bundle, prompt, 24, _shape_classifier(), _shape_features,
                                     per_class=3, rand_per_class=1)
    assert accuracy >= 0.7, accuracy
    assert rand_acc < 0.25, rand_acc


def test_shapes_vae_round_trip_keeps_the_drawing_and_its_stripes(ext, shapes_bundle):
    """The shapes model's VAE decodes what it encodes, stripes included: the target style must be
    something the decoder can draw, or no fine-tune could reach it."""
    from bench.digits import shapes
    from tools.train_demo_model import render_shapes

    splits = shapes.load_splits("striped_fixed", seed=0)
    for x16 in (splits.base_test_x[::40][:16], splits.target_test_x[::40][:16]):
        x = render_shapes(x16).permute(0, 2, 3, 1)  # (16, 32, 32, 3) in [0, 1]
        with torch.inference_mode():
            latent = shapes_bundle.vae.encode(x)
            back = shapes_bundle.vae.decode(latent).float()
        assert latent.shape == (16, 4, 4, 4)
        assert (back - x).abs().mean().item() < 0.08
    # the decoded striped shapes keep most of their stripe pattern (real ~0.9, a flat fill ~0)
    decoded16 = torch.nn.functional.avg_pool2d(back.permute(0, 3, 1, 2), 2) * 2 - 1
    assert float(shapes.stripe_score(decoded16).mean()) > 0.5


def test_demo_targets_node_loads_the_striped_shapes(ext, shapes_bundle):
    with torch.inference_mode():
        targets, images = ext.demo_nodes.PSODemoTargets.execute(shapes_bundle.vae, "striped shapes").result
    assert images.shape == (48, 32, 32, 3)
    assert targets.latents.shape == (48, 4, 4, 4)
    assert set(targets.prompts) == set(_shape_captions())
    with pytest.raises(ValueError, match="unknown targets 'stripes'"):
        ext.demo_nodes.PSODemoTargets.execute(shapes_bundle.vae, "stripes")
    with pytest.raises(ValueError, match="unknown model 'cats'"):
        ext.demo_nodes.PSODemoModelLoader.execute("cats")



def test_demo_targets_refuse_the_other_demo_models_vae(ext, bundle, shapes_bundle):
    """Digits targets on the shapes model (or the reverse) would sample references from captions the
    model never learnt and train on them without a word: refused, naming the choice that fits."""
    with torch.inference_mode(), pytest.raises(ValueError, match="Choose targets 'striped shapes'"):
        ext.demo_nodes.PSODemoTargets.execute(shapes_bundle.vae, "bold digits")
    with torch.inference_mode(), pytest.raises(ValueError, match="Choose targets 'bold digits'"):
        ext.demo_nodes.PSODemoTargets.execute(bundle.vae, "striped shapes")
    with torch.inference_mode():  # the matching pair, and a VAE that is not a demo model's, pass
        assert ext.demo_nodes.PSODemoTargets.execute(bundle.vae, "bold digits").result[1].shape[0] == 40
        other = copy.copy(shapes_bundle.vae)  # the same VAE as any other loader would give it
        del other.pso_demo_model
        assert ext.demo_nodes.PSODemoTargets.execute(other, "bold digits").result[1].shape[0] == 40


def test_vae_round_trip_keeps_a_digit(ext, bundle):
    from bench.digits.data import load_splits
    from tools.train_demo_model import render

    x = render(load_splits("bold").base_test_x[:16]).permute(0, 2, 3, 1)  # (16, 32, 32, 3) in [0, 1]
    with torch.inference_mode():
        latent = bundle.vae.encode(x)
        back = bundle.vae.decode(latent).float()
    assert latent.shape == (16, 4, 4, 4)
    assert (back - x).abs().mean().item() < 0.08
    # The UNet's input (latent x SD1.5's 0.18215) is roughly unit-variance, as the script sets it.
    assert 0.5 < float(latent.std() * 0.18215) < 2.0


def test_a_pso_lora_on_the_demo_model_loads_in_the_stock_lora_loader(ext, bundle, loras, caplog):
    import nodes as comfy_nodes  # ComfyUI's nodes.py

    with torch.inference_mode():
        conds = [bundle.clip.encode_from_tokens_scheduled(bundle.clip.tokenize(ext.demo.prompt(d)))
                 for d in (3, 7)]
    trained, net, _ = train_lora(ext.host, ext.lora, bundle, conds, steps=3, lr=3e-2)
    name = ext.lora_nodes.PSOSaveLoRA.execute(ext.host.lora_model_dict(net), bundle.model, "pso/demo",
                                              json.dumps({"method": "pso_offline"})).result[0]
    assert (loras / name).is_file()
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy_nodes.LoraLoader().load_lora(bundle.model, bundle.clip, name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text
    a, _ = _sample_digits(type("T", (), {"model": trained, "clip": bundle.clip, "vae": bundle.vae}),
                          ext.demo.prompt, per_digit=1)
    b, _ = _sample_digits(type("S", (), {"model": stock, "clip": bundle.clip, "vae": bundle.vae}),
                          ext.demo.prompt, per_digit=1)
    base, _ = _sample_digits(bundle, ext.demo.prompt, per_digit=1)
    assert (a - base).abs().max().item() > 1e-2, "training changed nothing: the comparison would be vacuous"
    assert (a - b).abs().max().item() < 1e-3


def test_shipped_weights_record_the_scripts_current_settings(ext):
    from dataclasses import asdict

    from tools.train_demo_model import SHAPES_CONFIG, DemoTrainConfig

    meta = ext.demo.read_metadata()
    assert {k: v for k, v in meta["config"].items() if k != "task"} == \
        {k: v for k, v in asdict(DemoTrainConfig()).items() if k != "task"}
    assert meta["captions"] == [ext.demo.prompt(d) for d in range(10)]
    shapes_meta = ext.demo.read_metadata(ext.demo.SHAPES_WEIGHTS_PATH)
    assert shapes_meta["config"] == asdict(SHAPES_CONFIG)
    assert shapes_meta["captions"] == _shape_captions()
    assert ext.demo.SHAPES_WEIGHTS_PATH.stat().st_size < 12_000_000


def test_demo_swaps_only_the_loader_of_the_shipped_example(object_info):
    from tools.demo import EXAMPLE, TASKS, demo_replace
    from tools.workflow import ui_to_api

    workflow = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    shipped = ui_to_api(workflow, object_info)
    cases = (("pso_offline", TASKS["shapes"]), ("sft", TASKS["shapes"]), ("sft", TASKS["digits"]))
    for method, task in cases:
        demo = ui_to_api(workflow, object_info, replace=demo_replace(method, task=task))
        assert demo.keys() == shipped.keys()
        changed = {k for k in shipped if shipped[k]["class_type"] != demo[k]["class_type"]}
        assert {shipped[k]["class_type"] for k in changed} == {"CheckpointLoaderSimple"}
        assert {demo[k]["class_type"] for k in changed} == {"PSODemoModelLoader"}
        for k in shipped:
            links = {n: v for n, v in shipped[k]["inputs"].items() if isinstance(v, list)}
            assert {n: v for n, v in demo[k]["inputs"].items() if isinstance(v, list)} == links, k
        assert next(v for v in demo.values() if v["class_type"] == "PSOTrain")["inputs"]["method"] == method
        loader = next(v for v in demo.values() if v["class_type"] == "PSODemoModelLoader")
        assert loader["inputs"] == {"model": task.model}
    seeded = ui_to_api(workflow, object_info, replace=demo_replace("sft", task=TASKS["shapes"], seed=3))
    assert {v["inputs"]["seed"] for v in seeded.values()
            if v["class_type"] in ("PSOTrain", "PSOSampleReferences")} == {3}


def test_demo_style_option_writes_its_targets_to_their_own_folder(tmp_path):
    """``tools.demo --style``: another bench style of the model's task (shapes' phase-random stripes),
    written to a folder of its own that the graph then reads; unknown styles are refused by name."""
    from bench.digits import shapes
    from tools.demo import TASKS, demo_replace, with_style, write_targets

    shipped = TASKS["shapes"]
    assert with_style(shipped, None) is shipped and with_style(shipped, "striped_fixed") is shipped
    task = with_style(shipped, "striped")
    assert task.target_folder == "pso_demo_shapes_striped" != shipped.target_folder
    graph_inputs = demo_replace("sft", task=task)["PSOTargetImagesFromFolder"]["inputs"]
    assert graph_inputs["folder"] == task.target_folder
    random_phase = write_targets(tmp_path / "r", task=task)
    fixed = write_targets(tmp_path / "f", task=shipped)
    assert len(list((tmp_path / "r").glob("*.png"))) == 48
    # the same held-out drawings, striped at other phases: same shape pixels, other stripe pixels
    assert torch.equal(random_phase.amax(dim=1) > -0.9, fixed.amax(dim=1) > -0.9)
    assert not torch.equal(random_phase, fixed)
    assert float(shapes.stripe_score(random_phase).mean()) > 0.5
    with pytest.raises(ValueError, match="choose one of"):
        with_style(TASKS["digits"], "striped")


@pytest.mark.slow
def test_training_script_prefix_is_reproducible():
    """Two runs of a short prefix of the training script give bitwise equal weights (same torch, CPU)."""
    from tools.train_demo_model import DemoTrainConfig, train

    torch.set_num_threads(1)
    cfg = DemoTrainConfig().scaled(0.005)
    a, _ = train(cfg)
    b, _ = train(cfg)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_file_is_in_the_packages_includes():
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"demo_model"' in text.split("includes", 1)[1].split("\n", 1)[0]
