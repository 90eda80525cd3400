"""Rebuild ``coco_to_imagenet.json``: COCO 2017 categories → ImageNet-1k class indices.

Run ``uv run python datamodules/data/build_coco_to_imagenet.py``. Works offline: ImageNet class
names come from ``torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``
(metadata shipped with torchvision, no download) and are written into the JSON next to every
index so the table can be reviewed by eye.

The table below was written by hand from the 1000 class names: a COCO category gets every
ImageNet class that is an instance of it (all dog breeds 151–268 for ``dog``, the five domestic
cats 281–285 for ``cat``, the bird ranges 7–24, 80–100, 127–146 for ``bird``, car body types
for ``car``, ...). The first index of each list is the representative class (the sample
``label`` of a per-object COCO sample); the whole list is the candidate set. Categories without
a counterpart among the 1000 classes (``person``, ``giraffe``, ``fire hydrant``, ...) are left
out of ``categories`` and listed under ``unmapped``; the datamodule skips and counts their
objects. Judgement calls, for reviewers: ambulance and police van count as ``car``; pickup as
``truck``; streetcar as ``train``; cheeseburger as ``sandwich``; cleaver as ``knife``; stove as
``oven``; book jacket as ``book``; street sign as ``stop sign``; computer monitor as ``tv``;
goblet as ``wine glass``; flower pot as ``potted plant``; giant panda as ``bear``.
"""

from __future__ import annotations

import json
from pathlib import Path

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}  # fmt: skip

MAPPING: dict[int, list[int]] = {
    2: [671, 444],  # mountain bike, bicycle-built-for-two
    3: [817, 436, 468, 511, 609, 627, 656, 661, 751, 407, 734],
    4: [670, 665],  # motor scooter, moped
    5: [404, 895],  # airliner, warplane
    6: [779, 874, 654],  # school bus, trolleybus, minibus
    7: [547, 466, 565, 705, 820, 829],
    8: [867, 569, 555, 675, 717, 864],
    9: [814, 403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 833, 871, 914],
    10: [920],
    13: [919],  # street sign
    14: [704],
    15: [703],  # park bench
    16: [*range(7, 25), *range(80, 101), *range(127, 147)],
    17: [281, 282, 283, 284, 285],
    18: list(range(151, 269)),
    19: [339],  # sorrel
    20: [348, 349],  # ram, bighorn
    21: [345, 346],  # ox, water buffalo
    22: [386, 385, 101],  # African elephant, Indian elephant, tusker
    23: [294, 295, 296, 297, 388],
    24: [340],
    27: [414],
    28: [879],
    31: [748],  # purse
    32: [906, 457, 451],  # Windsor tie, bow tie, bolo tie
    35: [795],  # ski
    37: [805, 429, 430, 522, 574, 722, 768, 852, 890],
    43: [752],  # racket
    44: [898, 440, 720, 737, 907],
    46: [572],  # goblet
    47: [968, 504],  # cup, coffee mug
    49: [499],  # cleaver
    50: [910],  # wooden spoon
    51: [809, 659],  # soup bowl, mixing bowl
    52: [954],
    53: [948],  # Granny Smith
    54: [933],  # cheeseburger
    55: [950],
    56: [937],
    58: [934],
    59: [963],
    62: [559, 423, 765, 857],  # folding, barber, rocking chair, throne
    63: [831],  # studio couch
    64: [738],  # pot (flowerpot)
    65: [564, 520],  # four-poster, crib
    67: [532],
    70: [861],  # toilet seat
    72: [851, 664],  # television, monitor
    73: [620, 681],  # laptop, notebook
    74: [673],
    75: [761],
    76: [508],
    77: [487],
    78: [651],
    79: [827],  # stove
    80: [859],
    81: [896],  # washbasin
    82: [760],
    84: [921],  # book jacket
    85: [409, 892, 530],  # analog, wall, digital clock
    86: [883],
    88: [850],  # teddy
    89: [589],  # hand blower
}


def build() -> dict:
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000
    seen: dict[int, int] = {}
    for coco_id, classes in MAPPING.items():
        assert coco_id in COCO_CATEGORIES, coco_id
        assert len(set(classes)) == len(classes), coco_id
        for index in classes:
            assert 0 <= index < 1000 and index not in seen, (coco_id, index, seen.get(index))
            seen[index] = coco_id
    return {
        "description": (
            "COCO 2017 instance categories -> ImageNet-1k class indices (torchvision order). "
            "Built by datamodules/data/build_coco_to_imagenet.py from a hand-written table; "
            "the first class of each list is the representative label, the list is the "
            "candidate set. Categories under 'unmapped' have no ImageNet-1k counterpart."
        ),
        "target": "imagenet-1k",
        "num_classes": len(names),
        "class_names": names,
        "categories": [
            {
                "coco_id": coco_id,
                "coco_name": COCO_CATEGORIES[coco_id],
                "classes": MAPPING[coco_id],
                "class_names": [names[i] for i in MAPPING[coco_id]],
            }
            for coco_id in sorted(MAPPING)
        ],
        "unmapped": [
            {"coco_id": coco_id, "coco_name": name}
            for coco_id, name in sorted(COCO_CATEGORIES.items())
            if coco_id not in MAPPING
        ],
    }


def main() -> None:
    path = Path(__file__).with_name("coco_to_imagenet.json")
    path.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
