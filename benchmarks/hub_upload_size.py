"""Bytes uploaded per task when an 8-task stream is pushed to a Hub (the strict local test server).

Each finished task is one commit of the adapter folder plus a tag. ``adapter_model.safetensors``
holds only the newest task (and whatever can still change); every finished task's frozen tensors
are in a ``cmoe_task-<index>-<name>.safetensors`` shard whose bytes never change again (see
``cmoe_adapters/shards.py``). The client compares blob ids and does not send files that did not
change, so a push sends the main file, the one new shard of the task that just became old, the
config and the model card: the upload per task stays nearly flat while the adapter grows. The server
used here stores every file inline ("regular" upload, base64 in the commit payload, about 4/3 of
the raw size).

Uploaded per push in the default run (KiB), before the per-task shards (one file with every task)
and with them. Task 1 sends the first task's shard (its 4 initial experts); later pushes send two
tasks' worth (the newest in the main file, the previous one as its new shard), growing only with
the newest router, which spans all experts:

    task         0     1     2      3      4      5      6      7    total
    one file  4163  6466  8866  11374  13988  16710  19538  22474   103579
    shards    4163  6468  4719   4933   5148   5362   5576   5790    42159

    python benchmarks/hub_upload_size.py [--tasks 8] [--hidden 256] [--locator]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import transformers
from peft import get_peft_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hub_server import point_hf_client_at, run_hub_server

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.hub import HubTarget, model_card


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts-per-task", type=int, default=2)
    parser.add_argument("--locator", action="store_true", help="also fit each task's locator VAE")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4,
        )
    )  # fmt: skip
    config = ContinualMoEConfig(
        r=8, num_experts=4, top_k=2, experts_per_task=args.experts_per_task, locator_steps=10
    )
    model = get_peft_model(base, config)
    with tempfile.TemporaryDirectory() as scratch, run_hub_server() as hub:  # noqa: SIM117 (needs hub)
        with point_hf_client_at(hub.endpoint, os.path.join(scratch, "home")):
            target = HubTarget(repo_id="tester/stream", token=hub.token, private=True)
            target.ensure_repo()
            locator = ", locator VAE per task" if args.locator else ""
            print(f"# {args.tasks} tasks, {args.experts_per_task} new experts of rank 8 per task and layer, "
                  f"Llama hidden {args.hidden}, 4 layers{locator}\n")  # fmt: skip
            columns = ("task", "experts per layer", "adapter files (KiB)", "main file (KiB)")
            print("| " + " | ".join((*columns, "uploaded (KiB)", "files sent")) + " |")
            print("|---|---:|---:|---:|---:|---:|")
            for index in range(args.tasks):
                name = f"task{index}"
                model.add_task(name)
                with torch.no_grad():  # stands for training: the new experts and router change
                    for parameter in model.parameters():
                        if parameter.requires_grad:
                            parameter.normal_(std=0.02)
                if args.locator:
                    model.fit_locator(name, features=torch.randn(64, 2 * args.hidden) + index)
                folder = os.path.join(scratch, name)
                model.save_pretrained(folder)
                with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
                    handle.write(model_card(model.peft_config["default"], None, target.repo_id, name))
                before, commits = hub.bytes_received, len(hub.commits)
                target.push_task(folder, name, latest=True)
                sent = hub.commits[-1].files if len(hub.commits) > commits else {}
                weights = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
                total = sum(os.path.getsize(os.path.join(folder, f)) for f in weights)
                main_file = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
                experts = 4 + index * args.experts_per_task
                uploaded = (hub.bytes_received - before) / 1024
                print(f"| {name} | {experts} | {total / 1024:.0f} | {main_file / 1024:.0f} | {uploaded:.0f} "
                      f"| {len(sent)} |")  # fmt: skip


if __name__ == "__main__":
    main()
