{{/* Names */}}
{{- define "heliosdb-replication.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "heliosdb-replication.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "heliosdb-replication.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "heliosdb-replication.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "heliosdb-replication.selectorLabels" -}}
app.kubernetes.io/name: {{ include "heliosdb-replication.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "heliosdb-replication.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "heliosdb-replication.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
One TOML value. Helm reads every YAML number as a float: whole numbers are
written as integers (the daemon's integer keys refuse 1000.0); strings are
written as JSON strings, which are valid TOML basic strings.
*/}}
{{- define "heliosdb-replication.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "bool" .) -}}
{{- . -}}
{{- else if kindIs "slice" . -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "heliosdb-replication.tomlValue" $e }}{{ end }}]
{{- else -}}
{{- toString . | toJson -}}
{{- end -}}
{{- end }}

{{/* Sections (a map of maps) as TOML tables, each named prefix + section. */}}
{{- define "heliosdb-replication.tomlSections" -}}
{{- $prefix := .prefix }}
{{- range $section, $keys := .sections }}
[{{ $prefix }}{{ $section }}]
{{- range $k, $v := $keys }}
{{ $k }} = {{ include "heliosdb-replication.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the chart mounts what the daemon reads and writes. */}}
{{- define "heliosdb-replication.stateDir" -}}/var/lib/heliosdb{{- end }}

{{/*
The node file's shared sections: the values' `config`, with what the chart
manages laid over it (paths, ports, transport, key file).
*/}}
{{- define "heliosdb-replication.nodeSections" -}}
{{- $managed := dict
  "cdc" (dict "checkpoint_dir" (printf "%s/checkpoints" (include "heliosdb-replication.stateDir" .)))
  "monitoring" (dict "bind_address" "0.0.0.0" "prometheus_port" .Values.ports.metrics "health_check_port" .Values.ports.health)
  "transport" (dict "mode" .Values.mode) -}}
{{- if eq .Values.mode "capture" }}
{{- $_ := set $managed.transport "apply_url" .Values.transport.applyUrl }}
{{- end }}
{{- if eq .Values.mode "apply" }}
{{- $_ := set $managed.transport "listen_address" (printf "0.0.0.0:%d" (int .Values.ports.transport)) }}
{{- end }}
{{- if ne .Values.mode "local" }}
{{- $_ := set $managed.transport "ca_file" "/etc/heliosdb/tls/ca.crt" }}
{{- $_ := set $managed.transport "cert_file" "/etc/heliosdb/tls/tls.crt" }}
{{- $_ := set $managed.transport "key_file" "/etc/heliosdb/tls/tls.key" }}
{{- $_ := set $managed "encryption" (dict "key_file" (printf "/etc/heliosdb/keys/%s" .Values.encryption.keyName)) }}
{{- end }}
{{- toJson (mergeOverwrite (deepCopy .Values.config) $managed) }}
{{- end }}

{{- define "heliosdb-replication.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Connections from the operator's Secret; JSON logs. */}}
{{- define "heliosdb-replication.env" -}}
- name: HELIOSDB_LOG_FORMAT
  value: json
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if ne .Values.mode "apply" }}
- name: REPLICATION_SOURCE_CONNECTION
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connections.existingSecret }}
      key: {{ .Values.connections.sourceKey }}
{{- end }}
{{- if and (ne .Values.mode "capture") .Values.connections.targetKey }}
- name: REPLICATION_TARGET_CONNECTION
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connections.existingSecret }}
      key: {{ .Values.connections.targetKey }}
{{- end }}
{{- end }}

{{- define "heliosdb-replication.volumeMounts" -}}
# A directory, not a subPath: kubelet updates it when the ConfigMap changes.
- name: config
  mountPath: /etc/heliosdb/config
  readOnly: true
- name: state
  mountPath: {{ include "heliosdb-replication.stateDir" . }}
- name: state
  mountPath: /var/log/heliosdb
  subPath: logs
- name: tmp
  mountPath: /tmp
{{- if ne .Values.mode "local" }}
- name: keys
  mountPath: /etc/heliosdb/keys
  readOnly: true
- name: tls
  mountPath: /etc/heliosdb/tls
  readOnly: true
{{- end }}
{{- end }}
