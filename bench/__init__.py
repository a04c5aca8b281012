"""Side-by-side benchmarks of peftkit against Hugging Face PEFT, run from the repository root
as ``python -m bench.<name>`` (bench/README.md lists them). ``bench.harness`` holds what they
share; their results live in ``bench/results/``."""
