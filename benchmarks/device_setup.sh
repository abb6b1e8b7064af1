# Source on the GPU machine (after a kit's device-install calls): makes this checkout importable
# and registers its vllm.general_plugins entry point without pip or network.
# DUO_KIT picks the kit: .devkit (vLLM 0.26, ../shared/devkit; default) or .devkit033 (vLLM 0.33,
# benchmarks/devkit033). A 0.33 run also needs vllm_duo/_C.abi3.so built against torch 2.14.
source "${DUO_KIT:-.devkit}/bin/device-env.sh"
site=${PYTHONPATH%%:*}  # the kit's install folder, first on the path
export PYTHONPATH="$PWD:$PYTHONPATH"
mkdir -p "$site/vllm_duo-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm-duo\nVersion: 0.1.0\n' > "$site/vllm_duo-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nduo = vllm_duo.plugin:register\n' > "$site/vllm_duo-0.1.0.dist-info/entry_points.txt"
