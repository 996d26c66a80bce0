"""Extensions: the hook API (`api`, the only module extensions import), the hook specifications
(`hookspecs`), and the loader (`manager`)."""
