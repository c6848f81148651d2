from setuptools import find_packages, setup

setup(
    name="longcat_jax",
    version="0.1.0",
    description="The LongCat MoE model family (LongCat-Flash, -Flash-Lite, 2.0) in JAX/Flax: "
                "model, sharding, Pallas kernels, training recipe, inference.",
    python_requires=">=3.11",
    packages=find_packages(include=["longcat_jax", "longcat_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=2.0",
        "ml_collections>=1.0",
        "tensorstore>=0.1.80",
        "safetensors>=0.6",
        "ml_dtypes>=0.5",              # float8_e4m3fn / bfloat16 safetensors I/O (interop)
        "grain>=0.2.18,<0.3",
        "tokenizers>=0.21",
        "tqdm",
        "jinja2>=3.1.6",        # chat templates (longcat_jax.data.chat)
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # The TPU runtime/compiler plugin, pinned to the jax release (as `jax[tpu]==0.10.2` pins
        # it). On a CPU-only host it only serves ahead-of-time TPU compiles
        # (longcat_jax/parallel/tpu_target.py, experiments/plan.py --target tpu:...).
        "tpu": ["libtpu==0.0.42.1; sys_platform == 'linux'"],
        "test": [
            "libtpu==0.0.42.1; sys_platform == 'linux'",  # tests/test_tpu.py compiles for TPU topologies (no TPU needed)
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",
            "transformers>=5.23,<6",
            "mlx[cpu]>=0.32",          # tests/test_mlx_parity.py: mlx-lm's LongCat models as reference
            "mlx-lm>=0.32.2",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
