"""Per-kernel device times and host vs device time per call, ours vs the peer (see cosformer.profiling).

python scripts/profile_attention.py --out docs/benchmarks/profiles/<gpu>-kernels.txt
python scripts/profile_attention.py --device cpu     # smoke run
"""

from cosformer.profiling import main

if __name__ == "__main__":
    main()
