"""schemathesis hooks for the API fuzz: `format: image-base64` fields get real images (small PNGs and JPEGs of
random size and colour), since no JSON schema can say "these bytes are a picture"."""
import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def picture(draw) -> str:
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    colour = tuple(draw(st.integers(0, 255)) for _ in range(3))
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, draw(st.sampled_from(["PNG", "JPEG"])))
    return base64.b64encode(buf.getvalue()).decode()


schemathesis.openapi.format("image-base64", picture())
