"""Producer and consumer of one image ref, end to end, in a dozen lines.

    uv run python examples/refs_quickstart.py
"""

import base64
import io
import tempfile

from PIL import Image

from mmref.renderers import ContractMismatchError, ImageStore, layout_spec, make_ref, parse_ref, verify_ref

# Producer (environment / client): a data URL goes into the store, a ref comes out.
buffer = io.BytesIO()
Image.new("RGB", (1280, 720), (30, 120, 220)).save(buffer, "PNG")
url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
store = ImageStore(tempfile.mkdtemp(prefix="mmref-quickstart-"))
ref_string = make_ref(layout_spec("qwen2.5-vl"), store.put_data_url(url)).encode()
print(f"{len(ref_string)} bytes: {ref_string[:72]}...")

# Consumer (inference server / trainer): parse, check against its own spec, read verified bytes.
ref = parse_ref(ref_string)
verify_ref(ref, layout_spec("qwen2.5-vl"), stage="trainer")
print(f"{ref.asset}: {ref.width}x{ref.height} -> grid {ref.grid_thw}, {ref.num_tokens} placeholder tokens, "
      f"{len(store.read(ref))} verified bytes")

# A consumer configured with other resize parameters refuses the ref before any compute.
try:
    verify_ref(ref, layout_spec("qwen2.5-vl", max_pixels=256 * 28 * 28), stage="trainer")
except ContractMismatchError as exc:
    print(f"refused: {str(exc)[:110]}...")
