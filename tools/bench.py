"""Benchmark LoRS against LoRA, SQFT, SPP and full sparse fine-tuning (see lors_fx/bench.py, lors_fx/cli_bench.py).

    python tools/bench.py --quick --json quick.json
    python tools/bench.py --workloads llama_mlp --tokens 512 --ranks 16 --dtypes fp32
"""
from lors_fx.cli_bench import main

if __name__ == "__main__":
    main()
