#!/bin/sh
# Copies its standard input to $PROG_OUT/<message id> and its SPOT_* environment to <message id>.env.
cat > "$PROG_OUT/$SPOT_MESSAGE_ID"
env | grep '^SPOT_' > "$PROG_OUT/$SPOT_MESSAGE_ID.env"
