"""One image file: its bytes decoded to a uint8 RGB tensor, its JPEG header read, and a damaged one named. The
folder trees' workers, the shards' reader and `python shards.py` all read images through these."""
import numpy as np
import torch

from data.common import DataError


def read_image(path):
    """The file as a uint8 RGB tensor (3, H, W) (decode)."""
    from torchvision.io import read_file
    return decode(read_file(path))


def decode(data):
    """An image file's bytes (a uint8 tensor) as a uint8 RGB tensor (3, H, W): torchvision.io's decoder (JPEG with
    CMYK and grayscale, PNG, WebP, GIF), PIL for anything else it cannot read (bytes neither can read raise PIL's
    error)."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        img = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        import io

        from PIL import Image
        with Image.open(io.BytesIO(data.numpy().tobytes())) as pil:
            return torch.from_numpy(np.asarray(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
    if img.dtype != torch.uint8:  # a 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype
        img = to_dtype(img, torch.uint8, scale=True)
    return img


def jpeg_header(path):
    """(height, width, whether nvJPEG and a byte-for-byte copy can take it: a JPEG in RGB or grey) from the file's
    header alone."""
    from PIL import Image
    with Image.open(path) as img:
        return img.size[1], img.size[0], img.format == "JPEG" and img.mode in ("RGB", "L")


def raise_named(e, path, then, option="--data-dir", replace=True):
    """Raises a DataError naming the file for what PIL and torchvision.io raise on an image they cannot decode,
    and any other exception as it is (an OSError with an errno is the file system's: EIO, ESTALE, EMFILE).
    replace: the fix begins with replacing the file (not for a copy that is made again)."""
    import struct

    from PIL import Image
    if (not isinstance(e, (OSError, SyntaxError, EOFError, ValueError, struct.error, IndexError,
                           Image.DecompressionBombError))
            or isinstance(e, OSError) and e.errno is not None or isinstance(e, DataError)):
        raise e
    why = (str(e).splitlines() or [""])[0][:100]
    raise DataError(f"{option}: error while reading {path} ({type(e).__name__}: {why}); "
                    f"{'replace it with a good copy of the image and ' * replace}{then}") from None
