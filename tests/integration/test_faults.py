"""Fault injection: what the nodes do when training diverges, a disk fills up, a process is killed
mid-write, a file is corrupted or a resume cannot continue the run. The promise (README, "Under
faults") is: nothing silently wrong, nothing lost.

Faults are real, not simulated: a full disk is a small RLIMIT_FSIZE in a child process (the kernel
answers EFBIG exactly where ENOSPC would come), a crash is SIGKILL of a child process while it
writes, corruption is bytes changed on disk, and NaN is injected into the real model's forward pass
from a chosen training call on (a forward hook on the host's UNet).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from tiny_training import sampled_pairs_chain, train_node

from extension_loader import load_package

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()
    names = ("data_nodes", "train_nodes", "types", "training_run", "lora_nodes", "lora_files",
             "dataset_nodes", "pairing")
    return {m: importlib.import_module(f"comfyui-pso.nodes.{m}") for m in names}


@pytest.fixture(scope="module")
def chain(ext):
    b, _, _, pairs = sampled_pairs_chain(ext["data_nodes"], ext["types"])
    return b, pairs


def _train(ext, b, pairs, steps, **kw):
    return train_node(ext["train_nodes"], b, pairs, steps, **{"beta": 50.0, **kw})


def _run_name(summary: str) -> str:
    path = Path(json.loads(summary)["checkpoint"])
    return path.parent.name if path.name.startswith("step_") else path.name


def _child(code: str, fsize_limit: int | None = None, wait: bool = True, **env) -> subprocess.Popen:
    """Run ``code`` in a fresh Python with this repository's ``pso`` importable; with ``fsize_limit``
    the kernel refuses to grow any file past that many bytes (EFBIG, as a full disk refuses)."""
    def limit():
        if fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], preexec_fn=limit,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        proc.stdout_text = out
    return proc


# -- resume -------------------------------------------------------------------------------------------

def test_a_resume_that_cannot_move_forward_is_refused_and_returns_nothing(chain, ext, output_dir):
    b, pairs = chain
    first = _train(ext, b, pairs, 3, checkpoint_every=1)
    run = _run_name(first[3])
    for steps in (3, 2):  # at the run's step, or behind it: nothing to train
        with pytest.raises(ValueError, match=rf"'{run}' is already at step 3, and steps={steps} leaves "
                                             r"nothing to train \(steps is the new total"):
            _train(ext, b, pairs, steps, resume_from=run)
    with pytest.raises(ValueError, match=r"other settings \(method: run 'pso_offline', now 'sft'\)"):
        _train(ext, b, pairs, 5, resume_from=run, method="sft")
    with pytest.raises(ValueError, match=r"learning_rate: run 0.01, now 0.02.*seed: run 3, now 4"):
        _train(ext, b, pairs, 5, resume_from=run, learning_rate=2e-2, seed=4)
    fewer = dataclasses.replace(pairs, target=pairs.target[:4], reference=pairs.reference[:4],
                                reference_traj=pairs.reference_traj.select(list(range(4))),
                                prompt_index=pairs.prompt_index[:4])
    with pytest.raises(ValueError, match=r"other pairs \(6 pairs.*these are 4 pairs"):
        _train(ext, b, fewer, 5, resume_from=run)
    changed = dataclasses.replace(pairs, target=pairs.target + 0.01)  # same count, other images
    with pytest.raises(ValueError, match=r"other pairs \(6 pairs.*these are 6 pairs"):
        _train(ext, b, changed, 5, resume_from=run)
    # the refused resumes left the run as it was: it still continues
    resumed = _train(ext, b, pairs, 5, resume_from=run, checkpoint_every=2)
    info = json.loads(resumed[3])
    assert (info["steps_trained"], info["steps_this_run"], info["settings"]["steps"]) == (5, 2, 5)


def test_the_saved_lora_records_the_steps_actually_trained(chain, ext, output_dir, loras):
    b, pairs = chain
    first = _train(ext, b, pairs, 2)
    resumed = _train(ext, b, pairs, 4, resume_from=_run_name(first[3]))
    with torch.inference_mode():
        name = ext["lora_nodes"].PSOSaveLoRA.execute(resumed[1], b.model, "r/resumed", resumed[3]).result[0]
    with safetensors.safe_open(str(loras / name), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "4"
    assert json.loads(meta["pso.settings"])["steps_trained"] == 4


# -- NaN at a chosen step -----------------------------------------------------------------------------

class NanFrom:
    """Makes the host UNet's output NaN from its ``n``-th forward with gradients on (a training forward;
    the frozen model and sampling run without gradients) until removed."""

    def __init__(self, unet: torch.nn.Module, n: int):
        self.n, self.calls = n, 0
        self.handle = unet.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.n:
                return output * float("nan")
        return output


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_nan_mid_run_returns_the_newest_finite_state_and_sets_bad_checkpoints_aside(chain, ext, output_dir,
                                                                                   checkpoint_every):
    b, pairs = chain
    poison = NanFrom(b.model.model.diffusion_model, 9)
    try:
        out = _train(ext, b, pairs, 30, checkpoint_every=checkpoint_every, reference_refresh_every=0)
    finally:
        poison.handle.remove()
    trained, lora, loss_map, summary = out
    info = json.loads(summary)
    good = info["steps_trained"]
    assert 1 <= good < 30 and "max_grad_norm" not in info["stopped"]
    assert f"at step {good + 2} of 30" in info["stopped"]
    assert f"the weights after step {good}" in info["stopped"]
    assert len(loss_map["loss"]) == good and all(torch.isfinite(t).all() for t in lora.values())
    clean = _train(ext, b, pairs, good, reference_refresh_every=0)  # the same run, stopped there
    assert all(torch.equal(lora[k], clean[1][k]) for k in clean[1]), "the outputs are the state after good"
    run = output_dir / "pso_checkpoints" / _run_name(summary)
    kept = sorted(p.name for p in run.glob("step_*"))
    if checkpoint_every:  # the checkpoint whose weights gave the NaN forward is no longer "the newest"
        assert kept[-1] == f"step_{good:06d}" and list(run.glob(f".nonfinite_step_{good + 1:06d}_*"))
    else:
        assert kept == []


def test_nan_in_the_pairs_is_blamed_on_the_data(chain, ext, output_dir):
    b, pairs = chain
    bad = dataclasses.replace(pairs, reference=pairs.reference.clone())
    bad.reference[:] = float("inf")
    trainer = importlib.import_module("comfyui-pso.pso.trainer")
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 1 of 3.*reference held NaN or infinite "
                                                          r"values: the training data is broken"):
        _train(ext, b, bad, 3, reference_refresh_every=0)


# -- full disk ---------------------------------------------------------------------------------------

_TRAIN_TINY = """
    import json, torch
    from torch import nn
    from pso.lora import LoRAConfig, LoRANetwork
    from pso.trainer import TrainConfig, Trainer

    class Out:
        def __init__(self, loss): self.loss, self.metrics = loss, {{}}

    torch.manual_seed(0)  # nn.Linear's own init
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).requires_grad_(False)
    net = LoRANetwork.for_module(model, LoRAConfig(rank=8, target="all_linear"), g)
    net.attach(model)
    w = torch.randn(64, 8, generator=g)
    step_fn = lambda x, gen: Out((model(x) - torch.tanh(x @ w)).square().mean(dim=1))
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2, checkpoint_dir="{ckpt}")
    result = Trainer(net, step_fn, lambda s, gen: torch.randn(16, 64, generator=gen), cfg).train()
    adapter = {{k: v.tolist() for k, v in net.state_dict().items()}}
    print(json.dumps({{"steps": result.final_step, "loss": result.loss_history,
                      "errors": result.checkpoint_errors, "adapter": adapter}}))
"""


def test_a_full_disk_during_checkpoints_keeps_training_and_the_adapter(tmp_path):
    full = json.loads(_child(_TRAIN_TINY.format(ckpt=tmp_path / "full"), fsize_limit=4096).stdout_text)
    roomy = json.loads(_child(_TRAIN_TINY.format(ckpt=tmp_path / "roomy")).stdout_text)
    assert full["steps"] == 6 and full["loss"] == roomy["loss"] and full["adapter"] == roomy["adapter"]
    assert all("File too large" in e for e in full["errors"])
    failed = {e.split(" not written")[0] for e in full["errors"]}
    assert failed == {f"checkpoint after step {s}" for s in (2, 4, 6)}
    assert roomy["errors"] == []
    # nothing half-written is left as a checkpoint, and no temporary folders either
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == []
    assert [p.name for p in (tmp_path / "roomy").iterdir() if p.name.startswith("step_")]


_NODE_ON_A_FULL_DISK = """
    import json, resource, sys, tempfile
    sys.path[:0] = [*__import__("tools.comfy_host", fromlist=["x"]).host_sys_path(), "{repo}/tests",
                    "{repo}/tests/fixtures"]
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import folder_paths, torch
    from extension_loader import load_package
    from pso_test_fixtures import tiny_models
    load_package()
    train = __import__("importlib").import_module("comfyui-pso.nodes.train_nodes").PSOTrain
    types = __import__("importlib").import_module("comfyui-pso.nodes.types")
    folder_paths.set_output_directory(tempfile.mkdtemp())
    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=5)
        g = torch.Generator().manual_seed(0)
        latents = b.model.model.process_latent_in(torch.randn(8, 4, 8, 8, generator=g))
        cond = b.clip.encode_from_tokens_scheduled(b.clip.tokenize("a red circle"))
        pairs = types.PairSet(latents[:4].clone(), latents[4:].clone(), None,
                              torch.zeros(4, dtype=torch.long), ["a red circle"], [cond],
                              torch.tensor([14.6, 4.0, 1.5, 0.5, 0.0]), "euler")
    args = ("pso_offline", 4, 1e-2, 50.0, 4, 2, 1, 3, 0, "float32", False, 1, 0, "attention")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the run record fits, no checkpoint does
    with torch.inference_mode():
        _, full_lora, _, full_summary = train.execute(b.model, pairs, *args).result
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with torch.inference_mode():
        _, lora, _, summary = train.execute(b.model, pairs, *args).result
    same = all(torch.equal(full_lora[k], lora[k]) for k in lora)
    moved = any(bool(v.abs().max() > 0) for k, v in full_lora.items() if "lora_up" in k)
    print(json.dumps({{"same": same, "moved": moved, "full": json.loads(full_summary),
                      "roomy": json.loads(summary)}}))
"""


def test_the_train_node_on_a_full_disk_still_returns_its_lora():
    """The issue's case: checkpoint writes fail with EFBIG (a full disk); before, the node raised and
    the trained LoRA was lost. Now it returns the same LoRA as with room, and the summary says which
    checkpoints were not written (CPython ignores SIGXFSZ, so the write fails with EFBIG)."""
    proc = _child(_NODE_ON_A_FULL_DISK.format(repo=REPO), wait=False)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["same"] and got["moved"]
    assert got["full"]["steps_trained"] == 4 and "stopped" not in got["full"]
    assert [e.split(" not written")[0] for e in got["full"]["checkpoint_errors"]][:4] == [
        f"checkpoint after step {s}" for s in (1, 2, 3, 4)]
    assert "checkpoint_errors" not in got["roomy"]


_SAVE_PAIRS = """
    import torch
    from pso.dataset import DatasetFingerprint, PairDatasetWriter
    fp = DatasetFingerprint("sd15", 4, 32, 32, "SD15", [14.6, 1.0, 0.0], "euler")
    with PairDatasetWriter("{folder}", fp, shard_size=8) as w:
        for i in range(16):
            w.add(torch.randn(4, 32, 32), torch.randn(4, 32, 32), f"prompt {{i}}")
    print(len(w))
"""


def test_save_pairs_on_a_full_disk_fails_and_a_retry_succeeds(tmp_path):
    from pso.dataset import PairDataset

    folder = tmp_path / "pairs"
    proc = _child(_SAVE_PAIRS.format(folder=folder), fsize_limit=8192, wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "File too large" in err
    assert len(PairDataset.open(folder)) == 0  # the failed save left an empty dataset ...
    assert _child(_SAVE_PAIRS.format(folder=folder)).stdout_text.strip() == "16"  # ... that a retry reuses
    assert len(PairDataset.open(folder)) == 16


# -- kill -9 during a save ----------------------------------------------------------------------------

_SAVE_FOREVER = """
    import torch, pso.io as pio
    big = {{"w": torch.randn(4096, 4096)}}  # 64 MB: the write takes a while
    while True:
        pio.atomic_save_safetensors(big, "{path}")
"""


def _kill_while_writing(code: str, folder: Path, pattern: str) -> None:
    proc = _child(code, wait=False)
    try:
        deadline = time.time() + 120
        while not list(folder.glob(pattern)):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "the child never started writing"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_killed_file_save_leaves_no_torn_file_and_its_temporary_is_swept(tmp_path):
    import pso.io as pio

    target = tmp_path / "out.safetensors"
    _kill_while_writing(_SAVE_FOREVER.format(path=target), tmp_path, ".out.safetensors.*.tmp")
    if target.exists():  # a complete earlier save may be there: it must be whole
        assert safetensors.torch.load_file(str(target))["w"].shape == (4096, 4096)
    leftovers = list(tmp_path.glob(".out.safetensors.*.tmp"))
    assert leftovers, "SIGKILL runs no cleanup: the hidden temporary stays behind"
    pio.atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert all(p.exists() for p in leftovers), "a young temporary may be a write in progress: kept"
    for p in leftovers:
        _age(p, pio.STALE_TEMP_AGE_S + 1)
    pio.save_checkpoint(tmp_path, 1, {"a": torch.zeros(1)}, {"step": 1})  # any later write there sweeps
    assert not any(p.exists() for p in leftovers)


_CHECKPOINT_FOREVER = """
    import torch, pso.io as pio
    big = {{"w": torch.randn(4096, 2048)}}
    step = 0
    while True:
        step += 1
        pio.save_checkpoint("{folder}", step, big, {{"step": step}}, keep=2)
"""


def test_a_killed_checkpoint_save_leaves_complete_checkpoints_only(tmp_path):
    import pso.io as pio

    _kill_while_writing(_CHECKPOINT_FOREVER.format(folder=tmp_path), tmp_path, ".tmp_step_*")
    for step, path in pio.list_checkpoints(tmp_path):
        assert pio.load_checkpoint(path).state["step"] == step  # every listed one loads whole
    temps = list(tmp_path.glob(".tmp_step_*"))
    assert temps
    for p in temps:
        _age(p, pio.STALE_TEMP_AGE_S + 1)
    pio.save_checkpoint(tmp_path, 999, {"a": torch.zeros(1)}, {"step": 999})
    assert not list(tmp_path.glob(".tmp_step_*"))


# -- corrupted and hostile files ----------------------------------------------------------------------

def test_a_truncated_checkpoint_is_named_with_what_to_do(tmp_path):
    import pso.io as pio

    pio.save_checkpoint(tmp_path, 3, {"a": torch.randn(100)}, {"step": 3, "x": torch.randn(100)})
    adapter = tmp_path / "step_000003" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:50])
    with pytest.raises(pio.CheckpointError, match=r"adapter\.safetensors cannot be read .*damaged.*resume "
                                                   r"from an older step_NNNNNN folder"):
        pio.load_checkpoint(tmp_path)
    pio.save_checkpoint(tmp_path, 4, {"a": torch.randn(100)}, {"step": 4, "x": torch.randn(100)})
    state = tmp_path / "step_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(pio.CheckpointError, match=r"state\.pt cannot be read .*damaged"):
        pio.load_checkpoint(tmp_path)


def _saved_lora(ext, b, loras, name="x/base"):
    with torch.inference_mode(False):
        lora = {}
        unet = b.model.model.diffusion_model
        for path, module in unet.named_modules():
            if path.endswith("attn1.to_q"):
                out_f, in_f = module.weight.shape
                lora[f"diffusion_model.{path}.lora_down.weight"] = torch.randn(2, in_f) * 0.01
                lora[f"diffusion_model.{path}.lora_up.weight"] = torch.randn(out_f, 2) * 0.01
    with torch.inference_mode():
        rel = ext["lora_nodes"].PSOSaveLoRA.execute(lora, b.model, name, None).result[0]
    return loras / rel, rel


def _rewrite(path: Path, change) -> None:
    with safetensors.safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors, meta)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def _load(ext, b, rel):
    with torch.inference_mode():
        return ext["lora_nodes"].PSOLoraLoader.execute(b.model, rel, 1.0).result


def test_the_loader_refuses_a_wrong_shaped_lora_naming_the_layer(chain, ext, loras):
    b, _ = chain
    path, rel = _saved_lora(ext, b, loras)
    assert "Warnings: none" in _load(ext, b, rel)[1]

    def widen(tensors, meta):
        key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
        tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])

    _rewrite(path, widen)
    with pytest.raises(ValueError, match=r"refusing .*: 1 of its \d+ layers do not fit this MODEL, first "
                                         r"diffusion_model\..*attn1\.to_q\.weight: up \(\d+, 2\) x down"):
        _load(ext, b, rel)


def test_the_loader_warns_on_nan_weights_and_reports_damaged_metadata(chain, ext, loras):
    b, _ = chain
    path, rel = _saved_lora(ext, b, loras)

    def poison(tensors, meta):
        tensors[sorted(tensors)[0]][0] = float("nan")
        meta["pso.notes"] = "n" * 50_000_000  # 50 MB of metadata: the node's text stays small

    _rewrite(path, poison)
    info = _load(ext, b, rel)[1]
    assert "1 tensors hold NaN or infinite values" in info
    assert len(info) < 100_000 and "cut: 50,000,000 characters in the file" in info
    for bad, message in (("[1, 2]", "a JSON list, not the object"), ("[" * 100_000, "nests JSON deeper")):
        _rewrite(path, lambda tensors, meta, bad=bad: meta.update({"pso.base_fingerprint": bad}))
        with pytest.raises(ValueError, match=rf"damaged pso.base_fingerprint.*{message}"):
            _load(ext, b, rel)


def test_save_lora_refuses_nan_adapters_and_names_a_file_system_would_mangle(chain, ext, loras):
    b, _ = chain
    with torch.inference_mode(False):
        lora = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight":
                torch.full((2, 32), float("nan")),
                "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight":
                torch.zeros(32, 2)}
    with pytest.raises(ValueError, match=r"1 of the LoRA's 2 tensors hold NaN.*Nothing was saved"):
        ext["lora_nodes"].PSOSaveLoRA.execute(lora, b.model, "nan/lora", None)
    for prefix, message in (("x/.hidden", "starts with '.'"), ("new\nline", "control character"),
                            ("a" * 300, "is 300 bytes long")):
        with pytest.raises(ValueError, match=message):
            ext["lora_nodes"].PSOSaveLoRA.execute(lora, b.model, prefix, None)
    assert not any(loras.rglob("*"))


def test_files_and_folders_follow_the_umask(chain, ext, loras, output_dir, tmp_path):
    import pso.io as pio

    b, pairs = chain
    old = os.umask(0o022)
    try:
        path, _ = _saved_lora(ext, b, loras, "shared/lora")
        with torch.inference_mode():
            ext["dataset_nodes"].PSOSavePairs.execute(pairs, "shared", False)
        ckpt = pio.save_checkpoint(tmp_path / "ck", 1, {"a": torch.zeros(1)}, {"step": 1})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    shard = output_dir / "pso_pairs" / "shared" / "shard_00000.safetensors"
    assert oct(shard.stat().st_mode & 0o777) == oct(0o644)
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o755)
    assert oct((ckpt / "adapter.safetensors").stat().st_mode & 0o777) == oct(0o644)


# -- prompts -------------------------------------------------------------------------------------------

def test_a_five_megabyte_prompt_is_refused_before_the_tokenizer_sees_it(chain, ext):
    b, _ = chain
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"prompt is 5,000,000 characters long, over the limit of 10,000"):
        ext["pairing"].encode_prompt(b.clip, "x" * 5_000_000)
    assert time.perf_counter() - start < 1.0


def test_an_import_refuses_a_taken_dataset_name_before_reading_the_file(chain, ext, output_dir):
    b, pairs = chain
    (output_dir / "pso_pairs" / "taken").mkdir(parents=True)
    (output_dir / "pso_pairs" / "taken" / "manifest.json").write_text("{}")
    node = importlib.import_module("comfyui-pso.nodes.pickapic_nodes").PSOImportPreferencePairs
    # the source does not even exist: the name is checked first, so that is not what is reported
    for name, message in (("taken", "dataset 'taken' already exists and is not empty"),
                          ("n" * 160, "is 160 bytes long")):
        with pytest.raises(ValueError, match=message), torch.inference_mode():
            node.execute("no_such_file.parquet", b.model, b.clip, b.vae, pairs.sigmas, 64, 0, name)


# -- two servers sharing one output folder ------------------------------------------------------------

def test_a_run_being_trained_elsewhere_is_not_resumed_at_the_same_time(chain, ext, output_dir):
    """Two servers (or processes) sharing output/pso_checkpoints: new runs get distinct folders (created
    with mkdir, which only one caller wins); a run folder is trained by one process at a time (an OS
    lock, released when its holder exits or is killed), so a second resume is refused, not interleaved."""
    b, pairs = chain
    first = _train(ext, b, pairs, 2)
    run = output_dir / "pso_checkpoints" / _run_name(first[3])
    holder = _child(f"""
        import sys, time, pso.io as pio
        with pio.folder_lock("{run}", "run"):
            print("locked", flush=True)
            time.sleep(600)
    """, wait=False)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"the training run {run.name} is in use by another process "
                                             rf"\(pid {holder.pid} on .*Wait until it has finished"):
            _train(ext, b, pairs, 4, resume_from=run.name)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed holder: the lock went with it, and the run was left as it was
    assert json.loads(_train(ext, b, pairs, 4, resume_from=run.name)[3])["steps_trained"] == 4
