#!/bin/sh
# Prints terminal escapes, a carriage return, a bell, a tab and a DOS line ending.
cat > /dev/null
printf 'colour \033[31mred\033[0m\rover\007 tab\there\r\n'
printf 'clear \033[2J\033]0;title\007 end\n' >&2
