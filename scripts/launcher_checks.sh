# Sourced by the launchers: the checks they make before printing (DRY_RUN=1) or running a command, so a
# wrong path is named at once instead of after the job starts. Messages name the script the user ran:
# a launcher that runs another one sets UNI_MOE_LAUNCHER to its own name first.
launcher_name="${UNI_MOE_LAUNCHER:-$(basename "$0")}"
export UNI_MOE_LAUNCHER="$launcher_name"

die() {
  echo "$launcher_name: $*" >&2
  exit 2
}

# need_model_folder PATH...: each must be a folder.
need_model_folder() {
  local path
  for path in "$@"; do [ -d "$path" ] || die "no such model folder: $path"; done
}

# need_data_files PATH...: each must be a readable file.
need_data_files() {
  local path
  for path in "$@"; do [ -f "$path" ] && [ -r "$path" ] || die "no such data file: $path"; done
}
