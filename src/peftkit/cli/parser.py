"""The argument parser of every command (the only place options are declared)."""

from __future__ import annotations

import argparse

from ..chat import TRAIN_ON
from .models import cmd_compare, cmd_doctor, cmd_export, cmd_generate, cmd_info, cmd_merge
from .training import cmd_demo, cmd_train


RUN_CONFIG_HELP = (
    "--config FILE: every option is a key, spelled with underscores (max_steps: 200, batch_size: 8, "
    "train_on: last, pack: true, no_eos: true, targets: [q_proj, v_proj]); null leaves an option at its "
    "default; relative paths are read from the current folder. Flags on the command line override the "
    "file. A finished run's OUT/run.json is a config too ({model, data, config: the method config, options}): "
    "`peftkit train --config OUT/run.json --out OUT2` trains the same adapter. An unknown key or a value "
    "of the wrong type is an error naming the file and line.")


def build_parser() -> argparse.ArgumentParser:
    from .. import registry

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning without the classic mistakes.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare full fine-tuning and the four methods on one task (built-in or yours)")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps for every method (default 150)")
    demo.add_argument("--model", help="your model folder (with --data); default: the built-in reference decoder")
    demo.add_argument("--data", help="your JSONL data (with --model)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for the base model and the adapter (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train an adapter on a JSONL file", epilog=RUN_CONFIG_HELP)
    train.add_argument("--config", metavar="FILE", help="a .yaml, .yml or .json file of these options (see below); "
                       "flags given with it override the file")
    train.add_argument("--model", required=True, help="'reference' or a local model folder")
    train.add_argument("--data", required=True, help="JSONL: {messages} | {conversations} (ShareGPT) | {instruction, "
                       "input, output} (Alpaca) | {text} | {prompt, completion} | {text, label} | {input_ids[, labels]}")
    train.add_argument("--method", choices=[m.name for m in registry.METHODS], default="lora")
    train.add_argument("--out", required=True, help="output folder (run.json, train_log.jsonl, checkpoints/, adapter/)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--max-steps", "--steps", dest="steps", type=int,
                        help="optimizer steps (default: one epoch); --steps is the same option")
    length.add_argument("--epochs", type=float)
    train.add_argument("--lr", type=float, help="learning rate (default: the method's: LoRA 2e-4 at hidden size 4096, "
                       "scaled by sqrt(4096/hidden) for other widths; prompt 3e-2, prefix 1e-2, adapters 1e-4)")
    train.add_argument("--lora-plus-ratio", type=float, metavar="R",
                       help="with the default LoRA rate, train B at R times A's rate and A at half the "
                            "rate (LoRA+, Hayou et al. 2024; default 16); 1 trains both at the rate. "
                            "An explicit --lr trains everything at that one rate")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--eval-fraction", type=float, default=0.1, help="share held out for evaluation")
    train.add_argument("--eval-data", help="a held-out JSONL file (same format) instead of --eval-fraction")
    train.add_argument("--eval-limit", type=int, metavar="N",
                       help="score only the first N held-out examples, before and after training "
                            "(default: all; thousands of rows take minutes on a CPU)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-length", type=int, default=512, help="tokens kept per example")
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--eval-every", type=int, metavar="N",
                       help="held-out loss and accuracy every N steps, written to train_log.jsonl")
    train.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip each step's gradient to this total norm (default 1.0; 0: no clipping)")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: none)")
    chat = train.add_argument_group("data")
    chat.add_argument("--train-on", choices=TRAIN_ON, default="assistant",
                      help="conversations: the loss on every assistant turn (default), on the last one, "
                           "or on every token; always with the turn's end-of-turn token")
    chat.add_argument("--no-eos", dest="add_eos", action="store_false",
                      help="do not end {text} and {prompt, completion} examples with the tokenizer's EOS token")
    chat.add_argument("--pack", action="store_true",
                      help="pack several examples into each row of --max-length tokens, with no attention "
                           "across them (positions restart per example): fewer padding tokens; --batch-size "
                           "then counts rows. LoRA and adapters on causal LMs")
    hardware = train.add_argument_group("device and precision")
    hardware.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    hardware.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                          help="the frozen base's dtype (auto: bfloat16 on a GPU that has it, else float32); "
                               "a half dtype trains under autocast, float16 with a gradient scaler")
    hardware.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16", "float16", "base"],
                          help="adapter weights on a half-precision base (default float32; base: the base's dtype)")
    hardware.add_argument("--gradient-checkpointing", action="store_true",
                          help="recompute each block's activations in backward: far less memory, ~30%% more time")
    hardware.add_argument("--quantize", choices=["nf4"],
                          help="keep the frozen base's linear weights in 4-bit NF4 (QLoRA); needs bitsandbytes")
    hardware.add_argument("--nproc", type=int, metavar="N",
                          help="train data-parallel on N ranks of this machine (starts torchrun: one rank per GPU, "
                               "or per core with --device cpu); --batch-size is each rank's. Under torchrun, leave "
                               "it out")
    hardware.add_argument("--fsdp", action="store_true",
                          help="with --nproc N or under torchrun: shard the frozen base, adapters and optimizer "
                               "over the ranks (PyTorch FSDP2) instead of a whole copy on each, for a base that "
                               "does not fit one device; LoRA and adapters, not prompt/prefix or --quantize")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--no-progress", action="store_true")
    lora = train.add_argument_group("LoRA (--method lora)")
    lora.add_argument("--r", type=int)
    lora.add_argument("--alpha", type=float)
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    shared = train.add_argument_group("LoRA and adapters")
    shared.add_argument("--dropout", type=float)
    shared.add_argument("--targets", help="comma-separated module names, 'attention' or 'all-linear' (default: the architecture's)")
    adapter = train.add_argument_group("bottleneck adapters (--method adapter)")
    adapter.add_argument("--bottleneck", type=int)
    adapter.add_argument("--placement", choices=["houlsby", "pfeiffer", "parallel"])
    adapter.add_argument("--activation", choices=["relu", "gelu", "silu"])
    virtual = train.add_argument_group("prefix and prompt tuning (--method prefix | prompt)")
    virtual.add_argument("--virtual-tokens", type=int)
    virtual.add_argument("--projection-dim", type=int, help="prefix: MLP reparameterisation width")
    virtual.add_argument("--init", "--prompt-init", dest="init", choices=["random", "vocab", "text"],
                         help="how the virtual tokens start (prompt default: random at the embeddings' scale; "
                              "prefix default: vocab, the model's own keys and values of vocabulary tokens)")
    virtual.add_argument("--init-text", "--prompt-init-text", dest="init_text",
                         help="the text for --init text (encoded with the model's tokenizer)")
    train.set_defaults(func=cmd_train, method_config=None, option_sources=None)  # run_config sets the two

    check = sub.add_parser("doctor", help="check a model, its adapter and a checkpoint for the mistakes M1-M12 "
                                          "(and the adapter's chat template, D5)")
    check.add_argument("--model", required=True, help="'reference' or a local model folder")
    check.add_argument("--adapter", help="an adapter folder to load onto the model (peftkit's or Hugging Face PEFT's)")
    check.add_argument("--checkpoint", help="a saved file or folder (save_pretrained, Trainer checkpoint-N) to check for base-model weights")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_doctor)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into the base weights: a model folder (--out) "
                                         "and/or a merged GGUF (--gguf)")
    merge.add_argument("--model", required=True, help="'reference', a local model folder, or a .gguf file "
                                                      "(needed for --gguf)")
    merge.add_argument("--adapter", required=True, help="a LoRA adapter folder")
    merge.add_argument("--out", help="a new folder for the merged model: safetensors (sharded past "
                                     "--max-shard-size), config and tokenizer")
    merge.add_argument("--gguf", metavar="OUT.gguf",
                       help="also, or instead, write the merged model as one GGUF file for llama.cpp / Ollama, "
                            "from the base .gguf given as --model")
    merge.add_argument("--gguf-type", choices=["f32", "bf16", "f16", "q8_0"], default="f16",
                       help="storage of the merged GGUF's weights (default f16; norms stay f32)")
    merge.add_argument("--max-shard-size", default="5GB",
                       help="with --out: the largest safetensors file, e.g. 5GB or 500MB; beyond it the weights are "
                            "split with a model.safetensors.index.json (transformers models; default 5GB)")
    merge.add_argument("--quantize", choices=["nf4"],
                       help="the adapter was trained on an NF4 base (--quantize nf4): merge into that base, dequantized")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                       help="the merged model's dtype (default: the model's); with --quantize, also the dtype the "
                            "base is quantized from: pass the one the adapter was trained in (bfloat16 on a GPU)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write a LoRA adapter as a GGUF LoRA file for llama.cpp (--lora), "
                                           "or as an Ollama model folder (--ollama)")
    export.add_argument("--adapter", required=True, help="a LoRA adapter folder, for a model of any architecture llama.cpp runs "
                                                         "(with --ollama also a GGUF LoRA file)")
    written = export.add_mutually_exclusive_group(required=True)
    written.add_argument("--gguf", help="the .gguf file to write")
    written.add_argument("--ollama", metavar="DIR", help="the folder to write for Ollama: Modelfile (FROM the base "
                         ".gguf, ADAPTER, TEMPLATE and stop from the chat template) and adapter.gguf; "
                         "needs a .gguf base (--model)")
    export.add_argument("--model", help="the base model's .gguf file or transformers folder (for its head counts; "
                                        "default: the adapter's base_model_name_or_path if it is local); "
                                        "--ollama needs the .gguf")
    export.add_argument("--ollama-template", metavar="FILE",
                        help="with --ollama: a hand-written Go template for TEMPLATE, for a chat template that "
                             "cannot be translated")
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing --gguf file, or the export in a non-empty --ollama folder")
    export.set_defaults(func=cmd_export)

    info = sub.add_parser("info", help="describe an adapter folder (and check that it is whole) or a model "
                                       "(folder or .gguf)")
    info.add_argument("path", help="an adapter folder, a model folder or a .gguf file")
    info.add_argument("--serve", choices=["vllm"],
                      help="say whether this serving engine loads the adapter folder as it is, and what to change")
    info.add_argument("--max-lora-rank", type=int, default=16,
                      help="with --serve vllm: the server's --max-lora-rank (vLLM's default 16)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text with a model and an optional adapter")
    gen.add_argument("--model", required=True)
    gen.add_argument("--adapter")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true",
                     help="send --prompt as the user's turn, rendered by the chat template saved with --adapter "
                          "(else the tokenizer's), and print the assistant's reply")
    gen.add_argument("--system", help="with --chat: a system turn before the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    compare = sub.add_parser("compare", help="trainable parameters of each method on a model (meta device, no weights)")
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--model", help="'reference' or a model folder")
    source.add_argument("--config", help="a config.json file")
    compare.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    compare.add_argument("--bottleneck", type=int, default=64)
    compare.add_argument("--prefix-tokens", type=int, default=10)
    compare.add_argument("--prompt-tokens", type=int, default=20)
    compare.set_defaults(func=cmd_compare)

    from .serve import cmd_serve  # here, beside its block: the other commands' imports stay untouched

    serve = sub.add_parser("serve", help="serve a GGUF model with several LoRA adapters over llama.cpp's "
                                         "OpenAI-compatible server (the request's \"model\" picks one)")
    serve.add_argument("--model", required=True, help="the base model's .gguf file")
    serve.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH[:SCALE]",
                       help="repeatable: a GGUF LoRA file or a LoRA adapter folder (exported to GGUF first), "
                            "served as \"model\": NAME; SCALE multiplies its effect (default 1). "
                            "\"base\" is always served too, without an adapter")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--n-ctx", type=int, default=2048, help="context size of every entry (default 2048)")
    serve.add_argument("--threads", type=int, help="CPU threads (default: llama_cpp.server's, half the cores)")
    serve.add_argument("--work-dir", help="folder for the exported and scaled adapters and the server's config "
                                          "(default: one under the peftkit cache named after the inputs)")
    serve.add_argument("--verbose", action="store_true", help="show llama.cpp's loading log on every model switch")
    serve.add_argument("--print-config", action="store_true",
                       help="prepare the adapters, write and print the config and the command; do not start")
    serve.set_defaults(func=cmd_serve)
    return parser
