"""The codes of the gender and race labels every builder writes (UTKFace's coding, which the
other datasets are mapped onto), and their names in reports, exports and predictions."""

GENDER_NAMES = ("male", "female")                          # gender 0, 1; -1 unknown
RACE_NAMES = ("White", "Black", "Asian", "Indian", "Other")  # race 0..4; -1 unknown
