"""Prompt vocabularies of the papers: state words and templates, combined state-major.

`{}` in a state is the object word; `{}` in a template is the state phrase.
"""
from __future__ import annotations

# WinCLIP's compositional prompt ensemble (CPE), as anomalib lists it. The template
# "a jpeg corrupted photo of the {}." appears twice in that list, so it weighs double.
WINCLIP_NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                         "{} without defect", "{} without damage"]
WINCLIP_ANOMALOUS_STATES = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
WINCLIP_TEMPLATES = [
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
]


def ensemble(states, templates, object_word: str) -> list[str]:
    """All `template.format(state.format(object))`, state-major (the order every official code uses)."""
    return [t.format(s.format(object_word)) for s in states for t in templates]


def winclip_prompts(object_word: str) -> tuple[list[str], list[str]]:
    """(normal, anomalous) CPE prompts: 7 x 21 = 147 and 4 x 21 = 84."""
    return (ensemble(WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES, object_word),
            ensemble(WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES, object_word))


# APRIL-GAN's prompt ensemble: 7 normal and 5 abnormal states x 35 templates (245 / 175 prompts).
# The class name goes in raw (MVTec's "metal_nut" keeps its underscore).
APRILGAN_NORMAL_STATES = WINCLIP_NORMAL_STATES  # the same seven states
APRILGAN_ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
APRILGAN_TEMPLATES = [
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
]


def aprilgan_prompts(object_word: str) -> tuple[list[str], list[str]]:
    """(normal, abnormal) APRIL-GAN prompts: 7 x 35 = 245 and 5 x 35 = 175."""
    return (ensemble(APRILGAN_NORMAL_STATES, APRILGAN_TEMPLATES, object_word),
            ensemble(APRILGAN_ABNORMAL_STATES, APRILGAN_TEMPLATES, object_word))


# AA-CLIP's anchor ensemble (dataset/constants.py PROMPTS): 3 normal + 5 abnormal states x 2 templates.
AACLIP_NORMAL_STATES = ["{}", "a {}", "the {}"]
AACLIP_ABNORMAL_STATES = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
AACLIP_TEMPLATES = ["{}.", "a photo of {}."]


def aaclip_prompts(object_word: str) -> tuple[list[str], list[str]]:
    """(normal, abnormal) AA-CLIP prompts: 3 x 2 = 6 and 5 x 2 = 10."""
    return (ensemble(AACLIP_NORMAL_STATES, AACLIP_TEMPLATES, object_word),
            ensemble(AACLIP_ABNORMAL_STATES, AACLIP_TEMPLATES, object_word))


# Bayes-PFL: the sentence "X <name>", lower-cased, whose word "X" is replaced by the learnable
# prompt; VisA folder names are spelled out first.
BAYESPFL_NAMES = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
                  "pcb2": "printed circuit board", "pcb3": "printed circuit board",
                  "pcb4": "printed circuit board", "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum",
                  "metal_nut": "metal nut"}


def bayespfl_sentence(class_name: str) -> str:
    return "X " + BAYESPFL_NAMES.get(class_name, class_name).lower()
