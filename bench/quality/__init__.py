"""Held-out quality of every method on real models and real data, peftkit beside Hugging Face PEFT.

Part 1: classification (``--cases classification``)
---------------------------------------------------
MiniLM (``all-MiniLM-L6-v2``: BERT, 6 layers, hidden 384, 22.7 M parameters) with a fresh
two-way ``classifier`` head, trained on Rotten Tomatoes review sentiment (bench/rotten_tomatoes.py:
12,808 reviews, split by movie, 10,231 to train and 2,577 held out). Cases:

    head                      only the head (pooler and classifier) trains (lr 1e-3)
    full                      full fine-tuning (lr 5e-5, the BERT paper's range)
    peftkit-qv                peftkit LoRA on query, value
    peftkit-all-linear        peftkit LoRA on "all-linear"
    peftkit-adapter-pfeiffer  peftkit bottleneck adapters after each feed-forward block
    peftkit-adapter-houlsby   ... and after each attention block
    peftkit-prefix            peftkit prefix tuning, 20 virtual tokens
    peftkit-prompt            peftkit prompt tuning, 20 virtual tokens
    peft-qv, peft-all-linear  Hugging Face PEFT LoRA, the same two target sets
    peft-prefix, peft-prompt  Hugging Face PEFT prefix and prompt tuning, 20 virtual tokens

Every adapter case trains the head in full beside its adapter: the classifier and the
pooler that feeds it (``modules_to_save=["pooler", "classifier"]`` in both libraries,
peftkit's default for a BERT classifier; all-MiniLM-L6-v2's pooler weights are near their
init, and a classifier behind a frozen one stays at the majority class). Everything else is
the same for every case: the tokenisation (the model's WordPiece, [CLS] ... [SEP], at most
128 tokens, which cuts no review: the longest is 78), batches of 32 padded to their longest
row in an order fixed by the seed, the training loop (``peftkit.train.train``: AdamW, no
weight decay, linear warm-up over the first 10 % of the steps then cosine decay to 0) and
the step budget (162 steps, about half an epoch). The learning rate is never tuned on the
held-out split: peftkit's cases train with peftkit's own defaults (M9: the optimizer groups
``peftkit.learning_rates.default_parameter_groups`` gives: the adapter at its method's rate, LoRA's
scaled to the model's width and split LoRA+ style into an A and a B rate, and the head trained
in full at its own rate; the report's lr column and param_groups in the JSON give each), each
PEFT case with the same rates as peftkit's same method (for LoRA the same A and B rates, as
PEFT's create_loraplus_optimizer would give), so the two implementations get the same chance.
bench/defaults_study.py shows how LoRA's split was chosen on a validation split of the training
reviews. Every case that is compared with another (full fine-tuning, LoRA, prefix and prompt,
both libraries) runs with three seeds (model head init, adapter init, dropout and data
order); head only and the bottleneck adapters, which PEFT lacks, with the first seed.

Part 2: generation (``--cases generation``)
-------------------------------------------
SmolLM2-135M-Instruct, loaded from its Q4_1 GGUF file (dequantised to float32; Llama with
grouped-query attention, 9 query and 3 key/value heads), asked in its chat template whether a
held-out review is positive or negative. ``gen-base`` is the model as it is; the other cases
train peftkit LoRA (the architecture default, q_proj and v_proj), prefix tuning and prompt
tuning (20 virtual tokens each) on {"prompt", "completion"} lines (the completion is the
answer word, then the end-of-turn token) at peftkit's method defaults. Accuracy: greedy
``generate`` (peftkit's own ``PeftModel.generate`` for the prefix and prompt, which runs the
virtual tokens through the KV cache) of a few tokens; the first "positive" or "negative" in
the answer is the prediction, and an answer naming neither counts as wrong.

What is measured
----------------
Each case (and seed) runs in a fresh Python subprocess, so that its peak resident memory is
its own. Per run: held-out accuracy and macro-F1 (the mean of the two classes' F1);
trainable parameters (unique tensors with requires_grad); seconds per step, the median of
the wall-clock time of each training step after the first 3 (which carry one-time costs);
the peak RSS of the process at the end of training (``ru_maxrss``: imports, model, data and
the training steps; before evaluation and saving); and the size on disk of what the case
saves (peftkit ``save``, PEFT ``save_pretrained``, the whole model for full fine-tuning,
the head's safetensors for head only), counted as its .safetensors and .json files. A run
that fails (an exception, a crash, a timeout) becomes an error row; the others still run.

Layout: ``cases`` (the case names, their fixed settings, what every run records),
``classification`` and ``generation`` (a run of each part, inside a worker process),
``report`` (rows, ratios, targets, the JSON and markdown) and ``__main__`` (the command line).

Usage (from the repository root):
        python -m bench.quality                      # both parts, all cases
        python -m bench.quality --reuse bench/results/quality.json   # only the runs it lacks
        python -m bench.quality --reuse bench/results/quality.json --rerun peftkit-qv,peft-qv
        python -m bench.quality --cases classification --seeds 42,43,44
        python -m bench.quality --cases peftkit-qv,peft-qv --steps 3 --eval-limit 64 --out /tmp/q
Writes: OUT/quality.json and OUT/quality.md (OUT defaults to bench/results). A run of one part
keeps the other part's section of an existing quality.json.
"""

