# Sourced by the launch scripts: one place for the environment every run needs.
# Processes on one machine talk over loopback only.
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [ "$MASTER_ADDR" = "127.0.0.1" ]; then export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"; fi
# Without a GPU, tell DeepSpeed so its accelerator detection never guesses.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  # CPU runs take the AVX2 code paths of torch's own kernels, MKL and oneDNN on every x86-64 CPU
  # that has them: left alone, each picks AVX-512 code where the CPU has it (MKL also differs
  # between Intel and AMD), other rounding makes sampled rollouts draw other tokens, and the same
  # run ends with other scores (docs/install.md, "Reproducible runs"). DS_MOEKD_CPU_ISA=native
  # keeps each library's own choice.
  if [ "${DS_MOEKD_CPU_ISA:-avx2}" = avx2 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}" MKL_CBWR="${MKL_CBWR:-AVX2}"
    export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"
  fi
fi
# DeepSpeed compiles some C++ ops on first use (about a minute each): keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds-moekd/torch_extensions}"
export TOKENIZERS_PARALLELISM=false
