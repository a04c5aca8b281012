"""Method declarations: one module per method, each holding everything that makes it a method.

    common.py    the ``Method`` record every declaration ends with, and what prompt and prefix share
    lora.py      LoraConfig, how LoRA is attached, its adapter_config.json fields, its record
    adapter.py   the same for bottleneck adapters (AdapterConfig)
    prefix.py    the same for prefix tuning (PrefixConfig)
    prompt.py    the same for prompt tuning (PromptConfig)

The modules with the parameters (nn.Modules, plain torch) are in ``methods/``; a declaration
says how such a module is configured, put on a model and written to a file. ``registry.py``
lists the records: a new method is its module(s) and one line there.
"""
