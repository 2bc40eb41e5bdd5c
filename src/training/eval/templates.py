"""Class names and prompt templates of the standard zero-shot benchmarks.

ImageNet and its variants use open_clip's `IMAGENET_CLASSNAMES` and `OPENAI_IMAGENET_TEMPLATES` (the 80 prompts of
the CLIP paper). The other sets use the prompts OpenAI published per dataset with CLIP (also CLIP_benchmark's).
Templates are `str.format` strings with one `{}` (CLIP_benchmark's `{c}` is accepted) or callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

Template = str | Callable[[str], str]

CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
STL10_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")
PETS_TEMPLATES = ("a photo of a {}, a type of pet.",)

CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSNAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange",
    "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
)
# Oxford-IIIT Pet class ids 1..37 (annotations/*.txt column 2), the breed names of the image file prefixes.
PETS_CLASSNAMES = (
    "Abyssinian", "american bulldog", "american pit bull terrier", "basset hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British Shorthair", "chihuahua", "Egyptian Mau", "english cocker spaniel", "english setter",
    "german shorthaired", "great pyrenees", "havanese", "japanese chin", "keeshond", "leonberger", "Maine Coon",
    "miniature pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian Blue",
    "saint bernard", "samoyed", "scottish terrier", "shiba inu", "Siamese", "Sphynx", "staffordshire bull terrier",
    "wheaten terrier", "yorkshire terrier",
)
PETS_COARSE_CLASSNAMES = ("cat", "dog")  # annotations column 3 (SPECIES): 1 cat, 2 dog

TEMPLATE_SETS: dict[str, Sequence[Template]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "stl10": STL10_TEMPLATES,
    "pets": PETS_TEMPLATES,
}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k synset ids in sorted order (line i = class index i), shipped with the package."""
    text = resources.files("training.eval").joinpath("imagenet_wnids.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_subset_wnids(kind: str) -> list[str]:
    """The 200 sorted wnids of ImageNet-R (`imagenet-r`) or ImageNet-A (`imagenet-a`), shipped with the package (timm's
    `imagenet_r_synsets.txt` / `imagenet_a_synsets.txt`)."""
    name = {"imagenet-r": "imagenet_r_wnids.txt", "imagenet-a": "imagenet_a_wnids.txt"}[kind]
    text = resources.files("training.eval").joinpath(name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_classnames() -> list[str]:
    return list(IMAGENET_CLASSNAMES)


def normalize_template(t: Template) -> Template:
    """CLIP_benchmark writes `{c}`; everything here formats with a positional `{}`."""
    return t.replace("{c}", "{}") if isinstance(t, str) else t


def read_templates(path: str) -> list[str]:
    """One template per line; blank lines and `#` comments are skipped; each must contain `{}` or `{c}`."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    out = [normalize_template(line) for line in lines]
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder (bad: {bad[:1]})")
    return out


def read_classnames(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def render(template: Template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)
