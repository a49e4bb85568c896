"""`moelocal inspect`: what is in a GGUF model, read from its header alone."""

from __future__ import annotations

import typer
from rich.table import Table

from moelocal import _output
from moelocal.commands._common import JsonOpt, ModelArg, load_summary


def inspect(model: ModelArg = None, json: JsonOpt = False) -> None:
    """Summarize a GGUF model from its header: experts, parameters, bytes by tensor role.

    Shows the architecture, the experts (routed, used per token, shared), total parameters and the
    parameters one token really touches, and bytes per tensor role. Nothing is loaded.

    Examples:

      moelocal inspect Qwen3-30B-A3B-Q4_K_M.gguf

      moelocal inspect model-00001-of-00003.gguf --json
    """
    summary = load_summary(model)
    if json:
        _output.print_json(summary.to_dict())
    else:
        render(summary)


def render(s) -> None:
    hb, hc = _output.human_bytes, _output.human_count
    out = _output.out
    files = f"{len(s.files)} files" if len(s.files) > 1 else "1 file"
    out.print(f"[bold]{s.name}[/bold]  ({s.architecture}, {s.quantization}, {hb(s.file_size)} in {files})")
    moe = (
        f"{s.n_expert} experts, {s.n_expert_used} used per token"
        + (f", {s.n_expert_shared} shared" if s.n_expert_shared else "")
        + (f", first {s.leading_dense_layers} layers dense" if s.leading_dense_layers else "")
        if s.is_moe
        else "dense (no routed experts)"
    )
    out.print(f"layers {s.n_layer}, embedding {s.n_embd}, vocab {s.n_vocab}, context {s.context_length}")
    out.print(f"MoE: {moe}")
    extras = []
    if s.sliding_window:
        extras.append(f"sliding window {s.sliding_window} on {sum(s.swa_layers)} layers")
    if s.kv_lora_rank:
        extras.append(f"MLA (kv rank {s.kv_lora_rank}, q rank {s.q_lora_rank})")
    if s.recurrent_layers:
        extras.append(f"{len(s.recurrent_layers)} recurrent layers")
    if extras:
        out.print("attention: " + "; ".join(extras))
    if s.mtp_layers:
        skipped = s.tensor_bytes - sum(t.n_bytes for t in s.loaded_tensors)
        out.print(f"multi-token prediction: {len(s.mtp_layers)} layer(s)"
                  + (f", not loaded by llama.cpp ({hb(skipped)} of the file)" if skipped else ""))
    out.print(
        f"parameters: {hc(s.params_total)} total, {hc(s.params_active)} active per token "
        f"({s.bits_per_weight:.2f} bits per weight)"
    )
    table = Table(title="bytes by role", title_justify="left")
    table.add_column("role")
    table.add_column("params", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    params = s.params_by_role
    total = s.tensor_bytes or 1
    for role, n in sorted(s.bytes_by_role.items(), key=lambda kv: -kv[1]):
        table.add_row(role, hc(params.get(role, 0)), hb(n), f"{100 * n / total:.1f}%")
    out.print(table)
    if s.unknown_tensors:
        names = ", ".join(s.unknown_tensors[:5])
        _output.warn(f"{len(s.unknown_tensors)} tensors have names moelocal does not know: {names}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
