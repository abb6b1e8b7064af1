# Source on the GPU machine (after ../shared/devkit's device-install): makes this checkout
# importable and registers its vllm.general_plugins entry point without pip or network.
source .devkit/bin/device-env.sh
export PYTHONPATH="$PWD:$PYTHONPATH"
mkdir -p /tmp/site/vllm_duo-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-duo\nVersion: 0.1.0\n' > /tmp/site/vllm_duo-0.1.0.dist-info/METADATA
printf '[vllm.general_plugins]\nduo = vllm_duo.plugin:register\n' > /tmp/site/vllm_duo-0.1.0.dist-info/entry_points.txt
