"""Time one training step with peftkit's methods, side by side with Hugging Face PEFT.

What is measured
----------------
One optimiser step on a small random-weight Llama (8 layers, hidden 512, fp32, CPU):

    optimizer.zero_grad(set_to_none=True); loss = model(...).loss; loss.backward(); optimizer.step()

for twelve cases, each in its own fresh Python subprocess so that the peak resident
memory (``ru_maxrss``) belongs to that case alone. The LoRA group (``--cases lora``):

    full                 every parameter trainable (what LoRA is meant to avoid)
    floor                forward + backward with no parameter trainable; the input
                         embeddings are a detached leaf that requires grad, so the
                         backward still computes every activation gradient. No
                         optimiser step (nothing to update). This is the least any
                         adapter method can cost: an adapter adds its own small
                         matmuls and weight gradients on top of it.
    peft-qv              HF PEFT LoRA r=8 on q_proj, v_proj
    peft-all-linear      HF PEFT LoRA r=8 on every linear layer but lm_head
    peftkit-qv           peftkit LoRA r=8 on q_proj, v_proj
    peftkit-all-linear   peftkit LoRA r=8 on "all-linear"

and the other methods (``--cases methods``: these, plus full and floor):

    peft-prefix               HF PEFT prefix tuning, 20 virtual tokens
    peft-prompt               HF PEFT prompt tuning, 20 virtual tokens
    peftkit-adapter-pfeiffer  peftkit bottleneck adapter 64, after each feed-forward block
    peftkit-adapter-houlsby   peftkit bottleneck adapter 64, after attention and feed-forward
    peftkit-prefix            peftkit prefix tuning, 20 virtual tokens
    peftkit-prompt            peftkit prompt tuning, 20 virtual tokens

Every case trains on the same 4 x 256 real tokens. Prompt tuning runs 20 more
positions through every layer and prefix tuning attends over 20 more keys, so their
ratios to floor and full include that extra sequence.

Each case builds the same model from the same seed, runs ``--warmup`` untimed steps,
then times ``--steps`` steps and reports the median and the minimum step time, the
process's peak RSS at the end, and the trainable parameter count.

Why
---
The design targets for peftkit's LoRA are:

    * peftkit-qv         median step <= 1.03 x floor
    * peftkit-all-linear median step <= 1.08 x floor
    * no slower and no bigger (peak RSS) than PEFT with the same targets,

and for prefix and prompt tuning: no slower and no bigger than PEFT's same method.
(PEFT has no bottleneck adapters, so the adapter rows have no PEFT reference.)

The "floor" makes the first two checkable: it is the cost of the frozen model's
forward and backward, which LoRA cannot avoid. The PEFT rows make the third one
checkable on the same machine in the same run.

A case that fails (peftkit not importable yet, an exception in a step, a crash, a
timeout) becomes an error row with the message; the other cases still run.

Layout: ``cases`` (the case names, settings and targets, and what a worker process runs),
``report`` (runs pooled per case, ratios, targets, markdown) and ``__main__`` (the command line).

Usage (from the repository root):
        python -m bench.lora_step [--cases lora|methods|floor,peft-qv,...] [--steps 10]
Writes: bench/results/lora_step.json and bench/results/lora_step.md
"""
