"""Time one training step with peftkit's methods, side by side with Hugging Face PEFT.

What is measured
----------------
One optimiser step on a small random-weight Llama (8 layers, hidden 512, fp32, CPU):

    optimizer.zero_grad(set_to_none=True); loss = <loss>; loss.backward(); optimizer.step()

for up to fourteen cases, the loss being the model's own (``model(...).loss``) for PEFT and
full fine-tuning, and what ``peftkit train`` trains on for peftkit (``lm_loss.training_loss``:
fused, the logits never whole). The LoRA group (``--cases lora``, the default):

    full                 every parameter trainable (what LoRA is meant to avoid)
    floor                forward + backward with no parameter trainable; the outputs of
                         layer 0's q_proj and v_proj are made leaves that require grad,
                         so the backward computes every activation gradient above them
                         and none below: exactly as far down as LoRA on q, v needs, with
                         the fused loss (``lm_loss.backbone_loss``), the cheapest there
                         is. No optimiser step (nothing to update). LoRA on q, v does all
                         of this plus its own matmuls and weight gradients.
    peft-qv              HF PEFT LoRA r=8 on q_proj, v_proj
    peft-all-linear      HF PEFT LoRA r=8 on every linear layer but lm_head
    peftkit-qv           peftkit LoRA r=8 on q_proj, v_proj
    peftkit-all-linear   peftkit LoRA r=8 on "all-linear"
    peftkit-qv-own-loss, peftkit-all-linear-own-loss
                         the same on the model's own loss, as a transformers Trainer
                         computes it: peftkit's LoRA layers against PEFT's, loss alike

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

How
---
These VMs drift by ±30% in speed from one process to the next, so cases timed in
separate processes are not comparable. One worker process builds every case, runs
``--warmup`` untimed steps of each, then ``--rounds`` rounds of one step per case, the
order reversed every round. Each step is timed by the thread's CPU time
(``time.thread_time``) on one torch thread, else by the wall clock. Cases interleaved
in one process see the same drift, and every ratio is the median over the rounds of
(case / reference in the same round), which cancels it; the ratio of the two minima is
given beside it. Peak RSS comes from one fresh process per case (``--memory-warmup`` +
``--memory-steps`` steps), so it belongs to that case alone. All of this is done once
per allocator setting (``--malloc``): glibc as it comes, and as ``peftkit train`` sets
it (``peftkit.allocator.tune_for_training``).

Why
---
The design targets (issue 21, ``cases.TARGETS``):

    * peftkit-qv         step <= 1.02 x floor
    * peftkit-all-linear step <= 1.05 x floor
    * peftkit-qv         step <= 1.00 x peft-qv,          peak RSS <= 1.00 x peft-qv
    * peftkit-all-linear step <= 0.90 x peft-all-linear,  peak RSS <= 0.85 x peft-all-linear
    * peftkit-prefix, peftkit-prompt: step and peak RSS <= 1.00 x PEFT's same method

(PEFT has no bottleneck adapters, so the adapter rows have no PEFT reference.)

The floor makes the first two checkable: it is the frozen model's forward and the part
of its backward that LoRA cannot avoid. An earlier floor made the input embeddings the
leaf, so its backward went through layer 0 into the embeddings, which LoRA never needs,
and LoRA could come out faster than the floor. With this floor, a LoRA or full row
below 1.0 x floor (``cases.ABOVE_FLOOR``) is a measurement error, and the report marks
it so. The PEFT rows make the other targets checkable on the same machine in the same
process.

A case that cannot be built or fails a warm-up step becomes an error row with the
message; the other cases still run.

Layout: ``cases`` (the case names, settings and targets, the interleaved timing and
the memory worker), ``report`` (per-round ratios, targets, markdown) and ``__main__``
(the command line).

Usage (from the repository root):
        python -m bench.lora_step [--cases lora|methods|all|floor,peft-qv,...] [--rounds 8]
                                  [--malloc default|tuned|both]
        python -m bench.lora_step --cases methods --malloc default --name methods_step
Writes: OUT_DIR/NAME.json and OUT_DIR/NAME.md (default bench/results/lora_step.{json,md})
"""
