"""W6 and W7: PyTorch state dicts and Hugging Face checkpoint folders (issue #10).

W6 stores W2's BERT-like weights as a torch state dict, fp32 and bf16, next to torch.save
and safetensors.torch, and next to the same weights as a numpy dict in modelvault. It
then measures what a full fine-tune adds as a state dict, as a whole nn.Module and as a
save_pretrained folder. W7 is a checkpoint series of save_pretrained folders: a small
BERT and three fine-tunes of it. Both skip with a note when torch (or transformers) is
not installed.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from . import models, peers
from .report import MB, Section, Target, ratio
from .timing import Op, clear, measure, median, tree_bytes
from .workloads import (
    Context,
    expect,
    fresh_save,
    new_vault,
    open_vault,
    throughput_figures,
    vault_load,
    vault_save,
)

# A full fine-tune's update, as a share of the weights' std: W3's middle size (0.1 %).
UPDATE = 0.00002


def touch(weights: dict[str, Any]) -> dict[str, Any]:
    """Read one byte of every page of every tensor: a loader that maps the file and
    reads nothing yet (safetensors, torch.load's mmap) pays for its reads here, as a
    program using the weights would."""
    for value in weights.values():
        flat = value.reshape(-1).view(np.uint8) if isinstance(value, np.ndarray) else \
            value.reshape(-1).view(_torch_uint8())
        if len(flat):
            int(flat[::4096].sum())
    return weights


def summed(weights: dict[str, Any]) -> dict[str, Any]:
    """Sum every tensor, as issue #20's torch figure was measured: a loader that maps the
    file reads all of it here, and both sides pay the same sums."""
    for value in weights.values():
        float(value.sum())
    return weights


def _torch_uint8() -> Any:
    import torch

    return torch.uint8


def w6_torch(ctx: Context) -> Section:
    """A torch state dict, fp32 and bf16: against torch.save/load and safetensors.torch."""
    section = Section("W6", "PyTorch state dict (W2's BERT-like weights as torch tensors)")
    if not ctx.peer(section, "torch", "W6"):
        return section
    import torch

    shape = ctx.sizes.bert
    as_numpy = models.bert_fp32(shape)
    fp32 = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in as_numpy.items())
    bf16 = collections.OrderedDict((k, v.to(torch.bfloat16)) for k, v in fp32.items())
    has_safetensors = ctx.peer(section, "safetensors", "safetensors.torch")
    work = ctx.workdir("w6")
    ops: dict[str, Op] = {}
    for precision, weights in (("fp32", fp32), ("bf16", bf16)):
        _torch_ops(ops, work, precision, weights, has_safetensors)
    numpy_vault = work / "numpy.vault"
    ops["fp32 numpy dict modelvault save"] = Op(
        lambda: vault_save(numpy_vault, "bert", as_numpy), setup=lambda: new_vault(numpy_vault))
    ops["fp32 numpy dict modelvault load"] = Op(
        lambda: touch(vault_load(numpy_vault, "bert")))
    raw = {"fp32": models.nbytes(as_numpy), "bf16": models.nbytes(as_numpy) // 2}
    print(f"  W6: timing torch saves and loads of {raw['fp32'] / MB:.0f} MB, {ctx.runs} runs "
          "each", flush=True)
    times = measure(ops, ctx.runs)
    for precision, weights in (("fp32", fp32), ("bf16", bf16)):
        loaded = vault_load(work / f"{precision}.vault", "bert")
        expect(list(loaded) == list(weights) and all(
            torch.equal(loaded[k], weights[k]) for k in weights),
            f"modelvault's torch {precision} state dict differs")
        r = throughput_figures(section, {k: v for k, v in times.items()
                                         if k.startswith(precision)}, raw[precision])
        section.add(f"{precision} modelvault save / torch.save+fsync, throughput",
                    ratio(r[f"{precision} modelvault save"], r[f"{precision} torch.save+fsync"]),
                    "x", target=Target(">=", 0.5))
        section.add(f"{precision} modelvault load / torch.load, throughput",
                    ratio(r[f"{precision} modelvault load"], r[f"{precision} torch.load"]), "x")
        if has_safetensors:
            section.add(f"{precision} modelvault load / safetensors.torch load_file, throughput",
                        ratio(r[f"{precision} modelvault load"],
                              r[f"{precision} safetensors.torch load_file"]), "x")
    if has_safetensors:
        # Issue #20's goal, for fp32 like its numpy-dict one below, as it was measured:
        # each tensor summed after the load.
        section.add("fp32 modelvault load / safetensors.torch load_file, each tensor summed, "
                    "throughput", ratio(median(times["fp32 safetensors.torch load_file, summed"]),
                                        median(times["fp32 modelvault load, summed"])),
                    "x", target=Target(">=", 0.3))
        stored = (work / f"{precision}.vault").stat().st_size
        section.add(f"{precision} vault file", stored, "B")
        section.add(f"{precision} raw / vault file bytes", raw[precision] / stored, "x",
                    target=Target(">=", 1.18 if precision == "fp32" else 1.45))
    section.add("fp32 torch state dict load / same weights as a numpy dict, throughput",
                ratio(median(times["fp32 numpy dict modelvault load"]),
                      median(times["fp32 modelvault load"])), "x", target=Target(">=", 0.95))
    _fine_tune_forms(ctx, section, work, shape)
    section.note("loads read from the OS page cache; torch.load with weights_only=True (its "
                 "default); every load then reads one byte of each page of each tensor, so "
                 "a loader that maps the file pays for its reads; the summed rows sum every "
                 "tensor instead")
    return section


def _torch_ops(ops: dict[str, Op], work: Path, precision: str, weights: Any,
               has_safetensors: bool) -> None:
    import torch

    saved, vault = work / f"{precision}.pt", work / f"{precision}.vault"

    def torch_save() -> None:
        torch.save(weights, saved)
        peers.fsync(saved)

    ops[f"{precision} torch.save+fsync"] = Op(torch_save, setup=lambda: clear(saved))
    ops[f"{precision} torch.load"] = Op(lambda: touch(torch.load(saved)))
    if has_safetensors:
        from safetensors.torch import load_file, save_file

        tensors = work / f"{precision}.safetensors"

        def safetensors_save() -> None:
            save_file(weights, tensors)
            peers.fsync(tensors)

        ops[f"{precision} safetensors.torch save_file+fsync"] = Op(
            safetensors_save, setup=lambda: clear(tensors))
        ops[f"{precision} safetensors.torch load_file"] = Op(lambda: touch(load_file(tensors)))
        if precision == "fp32":
            ops["fp32 safetensors.torch load_file, summed"] = Op(
                lambda: summed(load_file(tensors)))
    ops[f"{precision} modelvault save"] = Op(lambda: vault_save(vault, "bert", weights),
                                             setup=lambda: new_vault(vault))
    ops[f"{precision} modelvault load"] = Op(lambda: touch(vault_load(vault, "bert")))
    if precision == "fp32":
        ops["fp32 modelvault load, summed"] = Op(lambda: summed(vault_load(vault, "bert")))


def _fine_tune_forms(ctx: Context, section: Section, work: Path, shape: Any) -> None:
    """A full fine-tune (every weight + N(0, UPDATE)) after its base, as a numpy dict, a
    torch state dict, a whole nn.Module and a save_pretrained folder: added bytes over
    the same version saved alone."""
    import torch

    base = models.bert_fp32(shape)
    rng = np.random.default_rng(2)
    tuned = {k: w + models.normal(rng, w.shape, std=UPDATE) for k, w in base.items()}
    forms: dict[str, Any] = {
        "numpy dict": (lambda w: w),
        "torch state dict": (lambda w: collections.OrderedDict(
            (k, torch.from_numpy(v)) for k, v in w.items())),
        "nn.Module": _module_of,
    }
    if ctx.peer(section, "transformers", "the save_pretrained form"):
        forms["save_pretrained folder"] = None
    print("  W6: a full fine-tune in four forms", flush=True)
    for form, make in forms.items():
        path, alone_path = work / "ft.vault", work / "ft-alone.vault"
        clear(path)
        if make is None:
            added, alone = _folder_fine_tune(work, shape, base, tuned, path, alone_path)
        else:
            vault_save(path, "ft", make(base))
            added = vault_save(path, "ft", make(tuned)).added_bytes
            alone = fresh_save(alone_path, "ft", make(tuned)).added_bytes
        section.add(f"full fine-tune as a {form}: added / alone", added / alone, "x",
                    target=Target("<=", 0.55))


def _module_of(weights: dict[str, np.ndarray]) -> Any:
    import torch

    module = torch.nn.Module()
    for key, value in weights.items():
        module.register_parameter(key.replace(".", "_"),
                                  torch.nn.Parameter(torch.from_numpy(value),
                                                     requires_grad=False))
    return module


def _folder_fine_tune(work: Path, shape: Any, base: dict[str, np.ndarray],
                      tuned: dict[str, np.ndarray], path: Path, alone_path: Path
                      ) -> tuple[int, int]:
    """The same update through a BertModel's save_pretrained folders (saved as objects)."""
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                     num_hidden_layers=shape.layers,
                                     intermediate_size=shape.intermediate,
                                     max_position_embeddings=shape.positions,
                                     num_attention_heads=max(1, shape.hidden // 64))
    model = transformers.BertModel(config, add_pooling_layer=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def load(weights: dict[str, np.ndarray]) -> Any:
        # bert_spec keeps dense weights as [in, out]; torch's Linear holds [out, in].
        state = {k: torch.from_numpy(v if v.shape == shapes[k] else np.ascontiguousarray(v.T))
                 for k, v in weights.items() if k in shapes}
        model.load_state_dict(state, strict=False)
        return model

    vault_save(path, "ft", load(base))
    added = vault_save(path, "ft", load(tuned)).added_bytes
    alone = fresh_save(alone_path, "ft", load(tuned)).added_bytes
    return added, alone


def w7_checkpoints(ctx: Context) -> Section:
    """A Hugging Face checkpoint series: a small BERT's save_pretrained folders."""
    section = Section("W7", "Hugging Face checkpoint series: save_pretrained folders of a "
                            "small BERT and three fine-tunes")
    if not (ctx.peer(section, "torch", "W7") and ctx.peer(section, "transformers", "W7")):
        return section
    import torch
    import transformers

    small = ctx.quick
    config = transformers.BertConfig(vocab_size=30522, hidden_size=128 if small else 256,
                                     num_hidden_layers=2 if small else 4,
                                     num_attention_heads=4,
                                     intermediate_size=512 if small else 1024)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    work = ctx.workdir("w7")
    folders = []

    def checkpoint(label: str) -> None:
        folder = work / label
        model.save_pretrained(folder)
        folders.append((label, folder))

    checkpoint("base")
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # (a) the last layer retrained
            if f"layer.{config.num_hidden_layers - 1}." in name or "pooler" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.02)
    checkpoint("a last layer")
    with torch.no_grad():
        for parameter in model.parameters():  # (b) every weight nudged
            parameter.add_(torch.randn_like(parameter) * UPDATE)
    checkpoint("b full")
    with torch.no_grad():
        rows = torch.randperm(config.vocab_size)[:16]  # (c) 16 embedding rows replaced
        model.embeddings.word_embeddings.weight[rows] = torch.randn(16, config.hidden_size)
    checkpoint("c embedding rows")
    print(f"  W7: {len(folders)} checkpoints of {tree_bytes(folders[0][1]) / MB:.0f} MB",
          flush=True)
    vault = work / "series.vault"
    with open_vault(vault) as v:
        for number, (label, folder) in enumerate(folders):
            added = v.save_files("bert", folder).added_bytes
            if not number:
                section.add("base folder", tree_bytes(folder), "B")
                continue
            with open_vault(work / "alone.vault") as fresh:
                alone = fresh.save_files("bert", folder).added_bytes
            clear(work / "alone.vault")
            section.add(f"fine-tune ({label}): added", added, "B")
            section.add(f"fine-tune ({label}): added / the folder alone", added / alone, "x",
                        target=Target("<=", 0.55) if label.startswith("b") else None)
    section.add("vault file for 4 checkpoints", vault.stat().st_size, "B")
    section.add("4 checkpoint folders", sum(tree_bytes(f) for _, f in folders), "B")
    return section
