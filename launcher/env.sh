# Sourced by the launch scripts: one place for the environment every run needs.
# Processes on one machine talk over loopback only.
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [ "$MASTER_ADDR" = "127.0.0.1" ]; then export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"; fi
# Without a GPU, tell DeepSpeed so its accelerator detection never guesses.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
# DeepSpeed compiles some C++ ops on first use (about a minute each): keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds-moekd/torch_extensions}"
export TOKENIZERS_PARALLELISM=false
