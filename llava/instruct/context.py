"""COCO-style annotations -> the symbolic context a text-only teacher sees (LLaVA paper §3).

Per image: its captions, one per line, then one line per object, `category: [x1, y1, x2, y2]`
with the box normalised to [0, 1] by the image size and written with 3 decimals.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from llava import storage


@dataclass
class ImageContext:
    image_id: int
    file_name: str
    captions: list[str] = field(default_factory=list)
    objects: list[tuple[str, list[float]]] = field(default_factory=list)  # (category, [x1, y1, x2, y2] in [0, 1])

    def text(self) -> str:
        boxes = "\n".join(f"{category}: [{', '.join(f'{v:.3f}' for v in box)}]" for category, box in self.objects)
        return "\n".join(self.captions) + (f"\n\n{boxes}" if boxes else "")


def normalise_box(bbox: list[float], width: float, height: float) -> list[float]:
    """COCO [x, y, w, h] in pixels -> [x1, y1, x2, y2] in [0, 1] (clipped), rounded to 3 decimals."""
    x, y, w, h = bbox
    corners = [x / width, y / height, (x + w) / width, (y + h) / height]
    return [round(min(max(v, 0.0), 1.0), 3) for v in corners]


def load_contexts(captions_uri: str, instances_uri: str | None = None) -> list[ImageContext]:
    """Images with at least one caption, in image-id order, from COCO captions (+ instances) JSON."""
    captions = _coco(captions_uri, ("images", "annotations"))
    images = {img["id"]: img for img in captions["images"]}
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in captions["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    objects: dict[int, list] = defaultdict(list)
    if instances_uri:
        instances = _coco(instances_uri, ("images", "annotations", "categories"))
        images.update({img["id"]: img for img in instances["images"] if img["id"] not in images})
        names = {c["id"]: c["name"] for c in instances["categories"]}
        for ann in instances["annotations"]:
            img = images[ann["image_id"]]
            objects[ann["image_id"]].append(
                (names[ann["category_id"]], normalise_box(ann["bbox"], img["width"], img["height"]))
            )
    return [ImageContext(i, images[i]["file_name"], by_image[i], objects.get(i, [])) for i in sorted(by_image)]


def _coco(uri: str, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as error:
        raise ValueError(f"{uri}: not JSON ({error})") from error
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{uri}: not a COCO annotation file (missing {missing})")
    return data
