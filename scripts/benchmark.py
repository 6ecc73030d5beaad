"""Benchmark the op against the same function through PyTorch's fastest kernels (see cosformer.benchmark).

python scripts/benchmark.py                 # full grid: bf16+fp16, 2 shapes, 5 lengths, mask and GQA cases
python scripts/benchmark.py --quick         # bf16, n in {1024, 4096}
python scripts/benchmark.py --help
"""

from cosformer.benchmark import main

if __name__ == "__main__":
    main()
