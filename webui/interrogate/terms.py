"""The terms the CLIP interrogator ranks against an image, by kind. Written for this project (short
lists of common, descriptive words and of painters whose names are part of art history), not
taken from another tool's lists; A1111's are far longer, and a user's own list can be added as
`models/clip_interrogate/<kind>.txt` (one term per line)."""

from __future__ import annotations

from types import MappingProxyType

MEDIUMS = (
    "a photograph", "a digital painting", "an oil painting", "a watercolor painting", "a pencil sketch",
    "a charcoal drawing", "an ink drawing", "a 3D render", "a pixel art image", "a vector illustration",
    "a comic book panel", "an anime drawing", "a pastel drawing", "a woodcut print", "a linocut",
    "a mosaic", "a stained glass window", "a collage", "a sculpture", "a tapestry", "a screen print",
    "a matte painting", "a concept art piece", "a polaroid photo", "a film still",
)

MOVEMENTS = (
    "impressionism", "post-impressionism", "expressionism", "cubism", "surrealism", "art nouveau",
    "art deco", "baroque", "renaissance", "romanticism", "realism", "pop art", "minimalism",
    "abstract expressionism", "pointillism", "fauvism", "futurism", "bauhaus", "ukiyo-e",
    "photorealism", "symbolism", "rococo", "neoclassicism", "pre-raphaelite", "dadaism",
)

ARTISTS = (
    "Leonardo da Vinci", "Michelangelo", "Rembrandt", "Johannes Vermeer", "Caravaggio", "Claude Monet",
    "Vincent van Gogh", "Paul Cezanne", "Edgar Degas", "Pierre-Auguste Renoir", "Georges Seurat",
    "Henri Matisse", "Gustav Klimt", "Egon Schiele", "Edvard Munch", "Katsushika Hokusai",
    "Utagawa Hiroshige", "Albrecht Durer", "Sandro Botticelli", "Francisco Goya", "J. M. W. Turner",
    "John Constable", "Caspar David Friedrich", "Alphonse Mucha", "Hieronymus Bosch", "Pieter Bruegel the Elder",
    "El Greco", "Diego Velazquez", "Paul Gauguin", "Camille Pissarro", "Winslow Homer", "John Singer Sargent",
    "Mary Cassatt", "Henri de Toulouse-Lautrec", "Ivan Aivazovsky", "Ilya Repin", "Arkhip Kuindzhi",
)

FLAVOURS = (
    "highly detailed", "sharp focus", "soft focus", "bokeh", "dramatic lighting", "soft lighting",
    "golden hour", "backlit", "volumetric light", "cinematic", "moody", "vibrant colors", "muted colors",
    "pastel colors", "monochrome", "high contrast", "low contrast", "wide angle", "close-up", "portrait",
    "landscape", "symmetrical", "minimalist", "intricate", "ornate", "gritty", "dreamy", "foggy", "rainy",
    "snowy", "sunny", "night", "neon lights", "studio lighting", "natural light", "long exposure",
    "shallow depth of field", "aerial view", "isometric", "flat colors", "textured", "glossy", "matte",
    "warm tones", "cool tones", "film grain", "4k", "smooth", "rough brush strokes", "clean lines",
)

KINDS = MappingProxyType({"mediums": MEDIUMS, "movements": MOVEMENTS, "artists": ARTISTS, "flavours": FLAVOURS})
