# Sourced by the scripts: offline data location. The package never hard-codes it; a shared
# dataset directory beside the checkout (../shared/datasets) is used when it exists.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VAE_DATA_DIR:-}" ] && [ -d "$here/../shared/datasets" ]; then
    export VAE_DATA_DIR="$here/../shared/datasets"
fi
export ORT_DISABLE_TELEMETRY=1
