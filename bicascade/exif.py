"""What a photo says about itself: capture time (with its UTC offset when the file has one), camera, lens, GPS
position and media type, read from the EXIF of an image already opened for decoding (no second parse). JPEG, HEIC,
TIFF, PNG and WebP alike (Pillow and pillow-heif expose one EXIF interface). A field the file lacks is None; a
malformed EXIF block gives None fields and a warning, never an error: the picture is still indexed."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from PIL import Image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, DATETIME = 0x010F, 0x0110, 0x0132
DATETIME_ORIGINAL, OFFSET_ORIGINAL, LENS_MODEL = 0x9003, 0x9011, 0xA434
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4
MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "HEIF": "image/heic",
               "TIFF": "image/tiff", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
MAX_TEXT = 200
PARSE_WARNINGS = "bicascade.warnings"  # im.info key: what Pillow warned about while opening the file


@dataclass(frozen=True)
class Capture:
    media_type: str | None = None
    taken: datetime | None = None  # the wall-clock time on the camera (naive: what "taken on the 24th" means there)
    taken_offset: int | None = None  # its offset from UTC in minutes, when the file records one
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    warning: str | None = None  # a malformed EXIF block or field: what was skipped


def read(im: Image.Image) -> Capture:
    """The capture metadata of an opened (and, for TIFF, loaded) image."""
    media = MEDIA_TYPES.get(im.format or "", f"image/{im.format.lower()}" if im.format else None)
    with warnings.catch_warnings(record=True) as said:  # Pillow skips broken tags with a warning: keep it
        warnings.simplefilter("always")
        try:
            exif = im.getexif()
            main, gps = exif.get_ifd(EXIF_IFD), exif.get_ifd(GPS_IFD)
        except Exception as e:  # a block Pillow cannot walk: the pixels are still good
            return Capture(media, warning=f"unreadable EXIF ({type(e).__name__}: {str(e)[:120]})")
    skipped = [f"({text[:120]})" for text in [*im.info.get(PARSE_WARNINGS, []), *(str(w.message) for w in said)][:3]]

    def field(name: str, parse, *values: Any) -> Any:
        try:
            return parse(*values)
        except (ValueError, TypeError, ArithmeticError, IndexError):
            skipped.append(name)
            return None
    taken = field("capture time", _datetime, main.get(DATETIME_ORIGINAL) or exif.get(DATETIME))
    offset = field("UTC offset", _offset, main.get(OFFSET_ORIGINAL))
    lat = field("GPS latitude", _degrees, gps.get(GPS_LAT), gps.get(GPS_LAT_REF), 90)
    lon = field("GPS longitude", _degrees, gps.get(GPS_LON), gps.get(GPS_LON_REF), 180)
    if (lat is None) != (lon is None):
        lat = lon = None
    return Capture(media, taken, offset, _text(exif.get(MAKE)), _text(exif.get(MODEL)), _text(main.get(LENS_MODEL)),
                   lat, lon, f"malformed EXIF: {', '.join(skipped)} ignored" if skipped else None)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value[:MAX_TEXT] or None


def _datetime(value: Any) -> datetime | None:
    text = _text(value)
    if text is None or text.startswith("0000"):  # cameras write zeros for "unset"
        return None
    return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")


def _offset(value: Any) -> int | None:
    text = _text(value)
    if text is None:
        return None
    m = re.fullmatch(r"([+-])(\d\d):(\d\d)", text)
    if not m or int(m[2]) > 14 or int(m[3]) > 59:
        raise ValueError(text)
    return (1 if m[1] == "+" else -1) * (60 * int(m[2]) + int(m[3]))


def _degrees(dms: Any, ref: Any, limit: float) -> float | None:
    if dms is None:
        return None
    d, m, s = (float(x) for x in dms)
    value = d + m / 60 + s / 3600
    if _text(ref) in ("S", "W"):
        value = -value
    if not -limit <= value <= limit or value != value:
        raise ValueError(value)
    return round(value, 7)
