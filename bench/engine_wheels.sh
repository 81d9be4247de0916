# The wheels bench/engine_device.sh installs on the GPU machine (Python 3.12; torch, transformers, httpx, anyio,
# h11, pillow, prometheus-client, shellingham, markdown-it-py, pygments are already there): the server's web stack
# (fastapi needs opentelemetry-api since 0.16x), pydantic 2 with its compiled core, and the CLI's typer/click/rich
# at the versions this project is tested with, and httptools (uvicorn's C HTTP parser); NVML's bindings (the
# /health GPU reading) and paramiko with its dependencies (`llamactl status --deep` under load); the redis client
# (the server imports it for shared state). One version of each; ~4 MB. Run from the repository root that the
# device copies (the lead's checkout): .whl/ is ignored by .gitignore.
set -eu
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2 \
  typing-extensions==4.16.0 typer==0.29.2 click==8.5.1 rich==15.0.0 \
  nvidia-ml-py==13.615.71 paramiko==5.1.0 bcrypt==5.0.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
  redis==8.1.0 httptools==0.9.0 invoke==3.0.3 PyNaCl==1.6.2 PyYAML==6.0.4 Jinja2==3.1.6 MarkupSafe==3.0.4
ls .whl
