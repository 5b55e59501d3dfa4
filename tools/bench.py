"""Benchmark LoRS against LoRA, SQFT, SPP and full sparse fine-tuning (lors_fx/bench/harness.py;
the command line is lors_fx/cli/bench.py, also `lors-fx bench`).

    python tools/bench.py --quick --json quick.json
    python tools/bench.py --workloads llama_mlp --tokens 512 --ranks 16 --dtypes fp32
"""
from lors_fx.cli.bench import main

if __name__ == "__main__":
    main()
