"""Files: what peftkit writes and reads, given plain configs, facts and tensors (never a PeftModel).

    atomic.py          writing a file, or a folder of files, so that a crash leaves the old or the new
    adapter_folder.py  the adapter folder: file names, safetensors weights, AdapterFileError
    peft_config.py     adapter_config.json fields <-> peftkit's configs, one writer and reader per peft_type
    gguf.py            GGUF: the header reader, the LoRA adapter writer, llama.cpp's tensor names
"""
