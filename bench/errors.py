"""Errors a user can fix. Entry points print them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a folder, a flag): printed as one clear line."""


class WeightsUnavailable(UserError):
    """A pretrained network's weights cannot be found, verified or downloaded."""


class CheckpointError(UserError):
    """A checkpoint does not match the network: the message names the missing/unexpected keys."""


class NotTrainable(UserError):
    """The method has nothing to train (classical methods, frozen official checkpoints)."""
